"""Encoder-only weight transfer: aliases, stem remapping, formats, compatibility gate, report."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from nnpre.adaptation_plan import RESENC_L_ARCH_KWARGS, AdaptationPlan, resenc_l_default
from nnpre.checkpoints import read_pretrained, save_checkpoint_atomic
from nnpre.errors import NnPreError
from nnpre.weight_transfer import (
    TransferReport,
    check_compatibility,
    network_arch_kwargs,
    remap_stem_weight,
    stem_remap_rule,
    transfer_encoder,
)

torch.set_num_threads(1)


def tiny_plan(cls="ResidualEncoderUNet", channels=1, channel_names=None, **overrides):
    kw = copy.deepcopy(RESENC_L_ARCH_KWARGS)
    kw.update(n_stages=4, features_per_stage=[4, 8, 16, 32], kernel_sizes=[[3, 3, 3]] * 4,
              strides=[[1, 1, 1]] + [[2, 2, 2]] * 3, n_blocks_per_stage=[1, 2, 1, 1],
              n_conv_per_stage_decoder=[1, 1, 1])
    if cls == "PlainConvUNet":
        kw["n_conv_per_stage"] = [2, 2, 2, 2]
        del kw["n_blocks_per_stage"]
    kw.update(overrides)
    d = resenc_l_default().to_dict()
    d["architecture_plans"] = {"arch_class_name": cls, "arch_kwargs": kw,
                               "arch_kwargs_requiring_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    for k in ("key_to_encoder", "key_to_stem", "keys_to_in_proj"):
        del d[k]  # class defaults
    d["pretrain_num_input_channels"] = channels
    d["nnpre"] = {"pretext": "mae", "pretext_config": {"mask_ratio": 0.75}, "channel_names": channel_names}
    return AdaptationPlan.from_dict(d)


def pretrained_file(tmp_path, plan, name="pre.pth", seed=0, extra_keys=True, prefix="", with_plan=True):
    """Save a 'pretrained' network (random weights, seeded) in nnpre / nnssl layout; return (path, state dict)."""
    torch.manual_seed(seed)
    net = plan.build_network(plan.pretrain_num_input_channels, 1)
    with torch.no_grad():  # make every tensor distinct from a fresh init (norm weights are 1 at init)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = net.state_dict()
    weights = {prefix + k: v for k, v in sd.items()}
    if extra_keys:
        weights[prefix + "nnpre_conditioning.embed.weight"] = torch.randn(4, 4)
    ck = {"network_weights": weights}
    if with_plan:
        ck["nnssl_adaptation_plan"] = plan.to_dict()
    f = tmp_path / name
    save_checkpoint_atomic(ck, f)
    return f, {k: v.clone() for k, v in sd.items()}


def encoder_keys(sd):
    return [k for k in sd if k.startswith("encoder.")]


def test_encoder_loaded_through_every_alias_decoder_and_heads_untouched(tmp_path):
    plan = tiny_plan()
    f, src = pretrained_file(tmp_path, plan)
    torch.manual_seed(1)
    net = plan.build_network(1, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rep = transfer_encoder(str(f), net)
    after = net.state_dict()
    enc = encoder_keys(after)
    assert any(".all_modules.0." in k for k in enc) and any(".conv." in k for k in enc)
    for k in enc:  # both conv/all_modules aliases
        assert torch.equal(after[k], src[k]), k
        assert torch.equal(after["decoder." + k], src[k]), k  # the decoder.encoder view
    dec = [k for k in after if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert any(".seg_layers." in k for k in dec) and any(".transpconvs." in k for k in dec)
    for k in dec:
        assert torch.equal(after[k], before[k]), k  # still at init
        if after[k].shape == src[k].shape:
            assert not torch.equal(after[k], src[k]), k
    assert set(rep.loaded) == set(enc)
    assert set(rep.missing) == set(dec)
    assert "nnpre_conditioning.embed.weight" in rep.skipped
    assert all(not k.startswith(("encoder.", "decoder.encoder.")) for k in rep.skipped)
    assert rep.remapped == [] and not rep.stem_remapped and rep.source_format == "nnpre"


def test_report_is_printable_and_saved_as_json(tmp_path):
    plan = tiny_plan()
    f, _ = pretrained_file(tmp_path, plan)
    rep = transfer_encoder(f, plan.build_network(2, 2))
    text = str(rep)
    assert f"{len(rep.loaded)} keys loaded, 2 remapped" in text and "sum-spread 1->2" in text
    out = tmp_path / "run" / "pretrained_transfer.json"
    rep.save(out)
    back = json.loads(out.read_text())
    assert back["loaded"] == rep.loaded and back["stem_remapped"] is True
    assert TransferReport(**{k: v for k, v in back.items() if k != "stem_remapped"}).summary() == rep.summary()


def test_stem_remap_1_to_3_matches_nnssl_rule_and_preserves_the_response(tmp_path):
    plan = tiny_plan()
    f, src = pretrained_file(tmp_path, plan)
    net = plan.build_network(3, 2)
    rep = transfer_encoder(f, net)
    w0 = src["encoder.stem.convs.0.conv.weight"]  # (4, 1, 3, 3, 3)
    w = net.state_dict()["encoder.stem.convs.0.conv.weight"]
    assert w.shape == (4, 3, 3, 3, 3)
    assert torch.equal(w, w0.repeat(1, 3, 1, 1, 1) / 3)
    assert torch.equal(net.state_dict()["encoder.stem.convs.0.all_modules.0.weight"], w)
    assert torch.equal(net.state_dict()["encoder.stem.convs.0.conv.bias"], src["encoder.stem.convs.0.conv.bias"])
    assert rep.stem_remapped and sorted(rep.remapped) == ["encoder.stem.convs.0.all_modules.0.weight",
                                                         "encoder.stem.convs.0.conv.weight"]
    x = torch.randn(1, 1, 8, 8, 8)
    ref = F.conv3d(x, w0, padding=1)
    assert torch.allclose(F.conv3d(x.repeat(1, 3, 1, 1, 1), w, padding=1), ref, atol=1e-5)


@pytest.mark.parametrize("c_pt,c_down", [(1, 3), (2, 3), (3, 1), (3, 2)])
def test_remap_stem_weight_sum_spread_arithmetic(c_pt, c_down):
    g = torch.Generator().manual_seed(c_pt * 10 + c_down)
    w = torch.randn(5, c_pt, 3, 3, 3, generator=g)
    w2 = remap_stem_weight(w, c_down)
    assert w2.shape == (5, c_down, 3, 3, 3)
    expected = w.sum(1, keepdim=True).repeat(1, c_down, 1, 1, 1) / c_down
    assert torch.allclose(w2, expected)
    # identical-channel input: the remapped stem answers like the pretrained one
    x = torch.randn(1, 1, 6, 6, 6, generator=g)
    a = F.conv3d(x.repeat(1, c_pt, 1, 1, 1), w, padding=1)
    b = F.conv3d(x.repeat(1, c_down, 1, 1, 1), w2, padding=1)
    assert torch.allclose(a, b, atol=1e-5)
    if c_pt == 3 and c_down == 1:
        assert torch.allclose(w2[:, 0], w[:, 0] + w[:, 1] + w[:, 2])


def test_remap_by_channel_name_and_identity():
    w = torch.arange(2 * 3 * 1 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1, 1)
    src = {"0": "T1", "1": "T2", "2": "FLAIR"}
    # permutation with equal C
    w2 = remap_stem_weight(w, 3, src, {"0": "flair", "1": "T1", "2": "T2"})
    assert torch.equal(w2, w[:, [2, 0, 1]])
    # subset
    assert torch.equal(remap_stem_weight(w, 2, src, ["T2", "FLAIR"]), w[:, [1, 2]])
    # same names, same order: untouched copy
    assert stem_remap_rule(3, 3, src, src) == ("identity", None)
    assert torch.equal(remap_stem_weight(w, 3, src, src), w)
    # unknown target name: falls back to sum-spread
    assert stem_remap_rule(3, 2, src, ["T1", "DWI"])[0] == "sum-spread"
    with pytest.raises(NnPreError, match="must be"):
        remap_stem_weight(w.reshape(-1), 2)
    with pytest.raises(NnPreError, match=">= 1"):
        remap_stem_weight(w, 0)


def test_transfer_by_name_reorders_channels(tmp_path):
    plan = tiny_plan(channels=2, channel_names={"0": "T1", "1": "T2"})
    f, src = pretrained_file(tmp_path, plan)
    net = plan.build_network(2, 2)
    rep = transfer_encoder(f, net, target_channel_names={"0": "T2", "1": "T1"})
    w0 = src["encoder.stem.convs.0.conv.weight"]
    assert torch.equal(net.state_dict()["encoder.stem.convs.0.conv.weight"], w0[:, [1, 0]])
    assert rep.stem_remapped and any("by-name 2->2" in n for n in rep.notes)


def test_transfer_2_to_3_channels(tmp_path):
    plan = tiny_plan(channels=2)
    f, src = pretrained_file(tmp_path, plan)
    net = plan.build_network(3, 2)
    rep = transfer_encoder(read_pretrained(f), net)
    w0 = src["encoder.stem.convs.0.conv.weight"]
    assert torch.allclose(net.state_dict()["encoder.stem.convs.0.conv.weight"],
                          w0.sum(1, keepdim=True).repeat(1, 3, 1, 1, 1) / 3)
    assert rep.stem_remapped


@pytest.mark.parametrize("c_down", [1, 3])
def test_pretext_only_input_channels_are_dropped_before_remapping(tmp_path, c_down):
    plan = tiny_plan(channels=1)
    plan.extra_input_channels = 1  # e.g. diffusion: image + 1 appended channel, stem weight (F, 2, ...)
    torch.manual_seed(0)
    f, src = pretrained_file(tmp_path, AdaptationPlan.from_dict({**plan.to_dict(), "pretrain_num_input_channels": 2}))
    ck = torch.load(f, weights_only=True)
    ck["nnssl_adaptation_plan"] = plan.to_dict()  # the real plan: 1 image channel + 1 extra
    torch.save(ck, f)
    assert src["encoder.stem.convs.0.conv.weight"].shape[1] == 2
    net = plan.build_network(c_down, 2)
    rep = transfer_encoder(f, net)
    image_col = src["encoder.stem.convs.0.conv.weight"][:, :1]
    assert torch.equal(net.state_dict()["encoder.stem.convs.0.conv.weight"],
                       image_col.repeat(1, c_down, 1, 1, 1) / c_down)
    assert rep.stem_remapped and any("dropped 1 pretext-only input channel" in n for n in rep.notes)


def test_plain_conv_unet_source_stem_inside_encoder_stage0(tmp_path):
    plan = tiny_plan("PlainConvUNet")
    assert plan.key_to_stem == "encoder.stages.0"
    f, src = pretrained_file(tmp_path, plan, prefix="_orig_mod.")
    net = plan.build_network(2, 3)
    rep = transfer_encoder(f, net)
    sd = net.state_dict()
    w0 = src["encoder.stages.0.0.convs.0.conv.weight"]
    for k in ("encoder.stages.0.0.convs.0.conv.weight", "encoder.stages.0.0.convs.0.all_modules.0.weight",
              "decoder.encoder.stages.0.0.convs.0.conv.weight"):
        assert torch.equal(sd[k], w0.repeat(1, 2, 1, 1, 1) / 2), k
    for k in encoder_keys(sd):
        if "stages.0.0.convs.0" not in k or not k.endswith("weight") or "norm" in k or "all_modules.1" in k:
            assert torch.equal(sd[k], src[k]), k
    assert rep.stem_remapped and len(rep.loaded) == len(set(rep.loaded)) == len(encoder_keys(sd))


def test_nnssl_source_with_module_prefix_and_no_pretext_keys(tmp_path):
    plan = tiny_plan()
    d = plan.to_dict()
    del d["nnpre"]
    f, src = pretrained_file(tmp_path, plan, prefix="module.", extra_keys=False)
    ck = torch.load(f, weights_only=True)
    ck["nnssl_adaptation_plan"] = d
    torch.save(ck, f)
    net = plan.build_network(1, 2)
    rep = transfer_encoder(f, net)
    assert rep.source_format == "nnssl"
    assert all(torch.equal(net.state_dict()[k], src[k]) for k in encoder_keys(src))


def test_nnunet_format_source(tmp_path):
    plan = tiny_plan()
    torch.manual_seed(3)
    src_net = plan.build_network(2, 4)
    src = {k: v.clone() for k, v in src_net.state_dict().items()}
    plans = {"dataset_name": "Dataset998_Src", "plans_name": "nnUNetResEncUNetLPlans",
             "configurations": {"3d_fullres": {"patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0],
                                               "normalization_schemes": ["CTNormalization", "ZScoreNormalization"],
                                               "architecture": {"network_class_name": plan.dotted_network_class,
                                                                "arch_kwargs": plan.arch_kwargs,
                                                                "_kw_requires_import": ["conv_op", "norm_op",
                                                                                        "dropout_op", "nonlin"]}}}}
    f = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"module." + k: v for k, v in src.items()}, "optimizer_state": None,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": {"channel_names": {"0": "CT", "1": "PET"}},
                              "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)}, f)
    net = plan.build_network(1, 2)
    rep = transfer_encoder(f, net, target_channel_names={"0": "PET"})
    assert rep.source_format == "nnunet"
    w0 = src["encoder.stem.convs.0.conv.weight"]
    assert torch.equal(net.state_dict()["encoder.stem.convs.0.conv.weight"], w0[:, [1]])  # by name: PET
    assert torch.equal(net.state_dict()["encoder.stages.3.blocks.0.conv2.conv.weight"],
                       src["encoder.stages.3.blocks.0.conv2.conv.weight"])


def test_mismatch_lists_every_difference_and_the_fix_and_changes_nothing(tmp_path):
    plan = tiny_plan()
    f, _ = pretrained_file(tmp_path, plan)
    other = tiny_plan(features_per_stage=[4, 8, 16, 24], strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]])
    net = other.build_network(1, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NnPreError) as e:
        transfer_encoder(f, net)
    msg = str(e.value)
    assert "features_per_stage: checkpoint [4,8,16,32], target [4,8,16,24]" in msg
    assert "strides:" in msg and "kernel_sizes" not in msg and "n_stages" not in msg
    assert "nnPre_plan" in msg and f"--like {f}" in msg and "\n" not in msg
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # a different family is a mismatch too
    with pytest.raises(NnPreError, match="network: checkpoint ResidualEncoderUNet, target PlainConvUNet"):
        transfer_encoder(f, tiny_plan("PlainConvUNet").build_network(1, 2))


def test_unsupported_architecture_and_subclassed_target(tmp_path):
    plan = tiny_plan()
    f, src = pretrained_file(tmp_path, plan)
    ck = read_pretrained(f)
    ck.plan.architecture_plans = {"arch_class_name": "PrimusM", "arch_kwargs": None}
    with pytest.raises(NnPreError, match="PrimusM.*not supported"):
        transfer_encoder(ck, plan.build_network(1, 2))

    class MyUNet(type(plan.build_network(1, 2))):  # e.g. a trainer's subclass: same family, same keys
        pass

    kw = plan.arch_kwargs
    for k in ("conv_op", "norm_op", "nonlin"):
        kw[k] = {"conv_op": torch.nn.Conv3d, "norm_op": torch.nn.InstanceNorm3d, "nonlin": torch.nn.LeakyReLU}[k]
    net = MyUNet(input_channels=1, num_classes=2, **kw)
    transfer_encoder(f, net)
    assert torch.equal(net.encoder.stem.convs[0].conv.weight, src["encoder.stem.convs.0.conv.weight"])


def test_tensor_level_mismatch_not_visible_in_the_topology_is_reported(tmp_path):
    plan = tiny_plan()
    f, _ = pretrained_file(tmp_path, plan)
    net = tiny_plan(conv_bias=False).build_network(1, 2)  # same topology, no conv biases
    with pytest.raises(NnPreError, match=r"unexpected key encoder\.stages\..*bias.*--like"):
        transfer_encoder(f, net)


def test_check_compatibility_direct():
    a = tiny_plan().arch_kwargs
    assert check_compatibility(a, dict(a)) == []
    b = dict(a, n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 3,
             strides=[[1, 1, 1]] + [[2, 2, 2]] * 2, n_blocks_per_stage=[1, 2, 1])
    diffs = check_compatibility(a, b)
    assert [d.split(":")[0] for d in diffs] == ["n_stages", "features_per_stage", "kernel_sizes", "strides",
                                                "blocks_per_stage"]
    net = tiny_plan().build_network(1, 1)
    assert check_compatibility(a, network_arch_kwargs(net), "ResEncL", type(net).__name__) == []


def test_plan_less_nnssl_resenc_l_checkpoint(tmp_path, capsys):
    """Raw nnssl/OpenMind layout (network_weights only, _orig_mod. prefix): inferred ResEnc-L, 1 → 2 channels."""
    plan = resenc_l_default()
    with torch.device("meta"):
        src_net = plan.build_network(1, 1)
    src_net = src_net.to_empty(device="cpu")  # skip the slow He init; values are set below
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a distinct value per tensor is enough to trace it (random fill of 90M is slow)
        for i, p in enumerate(src_net.encoder.parameters()):
            p.fill_(0.001 * (i + 1))
        src_net.encoder.stem.convs[0].conv.weight.copy_(torch.randn(32, 1, 3, 3, 3, generator=g))
    enc = {k: v for k, v in src_net.state_dict().items() if k.startswith("encoder.")}
    f = tmp_path / "openmind_mae.pth"
    torch.save({"network_weights": {"_orig_mod." + k: v for k, v in enc.items()}}, f)
    with torch.device("meta"):
        tgt = plan.build_network(2, 3)
    tgt = tgt.to_empty(device="cpu")
    rep = transfer_encoder(f, tgt)
    err = capsys.readouterr().err
    assert "ResEnc-L layout" in err and "strides unknown" in err  # encoder only: strides are not stored
    sd = tgt.state_dict()
    w0 = enc["encoder.stem.convs.0.conv.weight"]
    assert torch.equal(sd["encoder.stem.convs.0.conv.weight"], w0.repeat(1, 2, 1, 1, 1) / 2)
    assert torch.equal(sd["decoder.encoder.stages.5.blocks.5.conv2.conv.weight"],
                       enc["encoder.stages.5.blocks.5.conv2.conv.weight"])
    assert rep.source_format == "nnssl" and len(rep.loaded) == len(enc) and rep.stem_remapped
