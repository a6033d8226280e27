"""Retina U-Net: nnU-Net key layout, builder, forward/backward smoke test and a tiny overfit run."""
import copy

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.abstract_arch import test_submodules_loadable as submodules_loadable
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnpre.adaptation_plan import unet_arch_kwargs
from nnpre.errors import NnPreError
from nnpre_detection.boxes import box_iou
from nnpre_detection.decoder import ufpn_channels
from nnpre_detection.retina_unet import build_retina_unet, default_decoder_levels

RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def arch_kwargs(kind="resenc", n_stages=4, blocks=(1, 1, 1, 1, 1, 1)):
    """What an nnU-Net plans file holds (class paths as strings), for a tiny 4-stage net."""
    resenc = kind == "resenc"
    return unet_arch_kwargs([min(8 * 2 ** i, 64) for i in range(n_stages)], [[3, 3, 3]] * n_stages,
                            [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
                            list(blocks)[:n_stages] if resenc else [2] * n_stages, [1] * (n_stages - 1),
                            blocks_key="n_blocks_per_stage" if resenc else "n_conv_per_stage")


def unet_from(kind, kw, in_ch=1):
    import pydoc
    resolved = {k: (pydoc.locate(v) if k in REQ_IMPORT and isinstance(v, str) else v) for k, v in kw.items()}
    cls = ResidualEncoderUNet if kind == "resenc" else PlainConvUNet
    return cls(input_channels=in_ch, num_classes=2, **resolved)


@pytest.mark.parametrize("kind,name", [("resenc", RESENC), ("plain", PLAIN)])
def test_encoder_keys_equal_nnunet_and_weights_transfer(kind, name):
    torch.manual_seed(0)
    kw = arch_kwargs(kind, blocks=(1, 2, 2, 2))
    unet = unet_from(kind, kw, in_ch=2)
    det = build_retina_unet(name, kw, num_input_channels=2, num_classes=1, head_channels=16)
    unet_sd = {k: v.shape for k, v in unet.state_dict().items() if k.startswith("encoder.")}
    det_sd = {k: v.shape for k, v in det.state_dict().items() if k.startswith("encoder.")}
    assert unet_sd == det_sd
    assert (det.key_to_encoder, det.key_to_stem, tuple(det.keys_to_in_proj)) == \
        (unet.key_to_encoder, unet.key_to_stem, tuple(unet.keys_to_in_proj))
    submodules_loadable(det)
    # everything outside `encoder.` is decoder / heads (what a decoder-only warm-up trains)
    prefixes = {k.split(".")[0] for k, _ in det.named_parameters()}
    assert prefixes == {"encoder", "decoder"} | {p.rstrip(".") for p in det.head_prefixes}
    # a pretrained nnU-Net encoder loads by key and then computes the same features
    enc = {k: v for k, v in unet.state_dict().items() if k.startswith("encoder.")}
    missing, unexpected = det.load_state_dict(enc, strict=False)
    assert not unexpected and not any(k.startswith("encoder.") for k in missing)
    x = torch.randn(1, 2, 16, 16, 16)
    unet.eval(), det.eval()
    with torch.no_grad():
        for a, b in zip(unet.encoder(x), det.encoder(x)):
            assert torch.allclose(a, b)


def test_transfer_module_loads_pretrained_encoder_with_stem_remap():
    """nnpre.weight_transfer.transfer_encoder fills the detector's encoder (1 -> 2 input channels)."""
    from nnpre.adaptation_plan import resenc_l_default
    from nnpre.checkpoints import ADAPTATION_PLAN_KEY, pretrained_from_dict
    from nnpre.weight_transfer import network_family, transfer_encoder

    kw = arch_kwargs(blocks=(1, 2, 1, 1))
    torch.manual_seed(0)
    src = unet_from("resenc", kw, in_ch=1).state_dict()
    plan = resenc_l_default().to_dict()
    plan["architecture_plans"] = {"arch_class_name": RESENC, "arch_kwargs": kw,
                                  "arch_kwargs_requiring_import": REQ_IMPORT}
    plan["pretrain_num_input_channels"] = 1
    ck = pretrained_from_dict({"network_weights": src, ADAPTATION_PLAN_KEY: plan})
    det = build_retina_unet(RESENC, kw, num_input_channels=2, num_classes=1, head_channels=16)
    if network_family(det) != det.encoder_family:
        pytest.xfail("nnpre.weight_transfer.network_family does not yet honour RetinaUNet.encoder_family")
    report = transfer_encoder(ck, det)
    sd = det.state_dict()
    stem_w = "encoder.stem.convs.0.conv.weight"
    assert sorted(report.remapped) == sorted([stem_w, "encoder.stem.convs.0.all_modules.0.weight"])
    assert torch.allclose(sd[stem_w], src[stem_w].repeat(1, 2, 1, 1, 1) / 2)
    assert all(torch.equal(sd[k], src[k]) for k in sd if k.startswith("encoder.") and k not in report.remapped)
    assert report.missing and all(not k.startswith("encoder.") for k in report.missing)


def test_builder_rejects_bad_plans():
    with pytest.raises(NnPreError, match="not supported"):
        build_retina_unet("my.nets.SwinUNETR", arch_kwargs(), 1, 1)
    with pytest.raises(NnPreError, match="3D only"):
        build_retina_unet(RESENC, {**arch_kwargs(), "conv_op": "torch.nn.modules.conv.Conv2d"}, 1, 1)
    with pytest.raises(NnPreError, match="cannot be imported"):
        build_retina_unet(RESENC, {**arch_kwargs(), "nonlin": "torch.nn.NoSuchThing"}, 1, 1)
    with pytest.raises(NnPreError, match="unknown Retina U-Net option"):
        build_retina_unet(RESENC, arch_kwargs(), 1, 1, head_chanels=16)
    with pytest.raises(NnPreError, match="anchor"):
        build_retina_unet(RESENC, arch_kwargs(), 1, 1, anchor_sizes=[((4, 8, 16),) * 3])  # 1 level, need 3


def test_nndetection_level_and_channel_rules():
    assert default_decoder_levels(6) == (2, 3, 4, 5)
    assert default_decoder_levels(5) == (1, 2, 3, 4)
    assert default_decoder_levels(4) == (1, 2, 3)
    assert ufpn_channels(6, 2, 128) == [32, 64, 128, 128, 128, 128]
    det = build_retina_unet(RESENC, arch_kwargs(), 1, 1, head_channels=16)
    assert det.decoder_levels == (1, 2, 3)
    assert det.decoder.channels == (16, 32, 32, 32)  # fpn = 4 x 8 base features
    assert det.anchor_generator.num_anchors_per_location == 27


def sphere_patch(shape=(32, 32, 32), centre=(14, 17, 15), radius=5, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    mask = ((grid - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= radius ** 2
    image = (rng.normal(0, 0.3, shape) + 2.0 * mask).astype(np.float32)
    return torch.from_numpy(image)[None, None], mask


def sphere_target(mask):
    from nnpre_detection.instances import boxes_from_instances
    boxes, _ = boxes_from_instances(mask.astype(np.int32))
    return {"boxes": torch.from_numpy(boxes), "labels": torch.zeros(len(boxes), dtype=torch.long),
            "seg": torch.from_numpy(mask)}


@pytest.fixture
def one_thread():
    """Single-threaded torch for the training loop (restored afterwards; the CI machine has 2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_forward_backward_smoke(one_thread):
    torch.manual_seed(0)
    det = build_retina_unet(RESENC, arch_kwargs(), 1, 2, head_channels=16)
    image, mask = sphere_patch()
    target = sphere_target(mask)
    losses = det(image, [target])
    assert set(losses) == {"cls", "reg", "seg_ce", "seg_dice", "loss"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert torch.allclose(losses["loss"], losses["cls"] + losses["reg"] + losses["seg_ce"] + losses["seg_dice"])
    assert losses["reg"] > 0  # the sphere got positive anchors
    losses["loss"].backward()
    for name in ("encoder.stem.convs.0.conv.weight", "decoder.lateral.0.weight", "classifier.out.weight",
                 "regressor.out.weight", "regressor.scales", "segmenter.conv.weight"):
        grad = dict(det.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # an image without objects still gives a finite loss (no regression term)
    empty = {"boxes": torch.zeros(0, 6), "labels": torch.zeros(0, dtype=torch.long),
             "seg": torch.zeros(32, 32, 32)}
    losses = det(torch.cat([image, image]), [target, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="labels must be class indices"):
        det(image, [{**target, "labels": torch.tensor([5])}])

    det.eval()
    preds = det(image)
    assert len(preds) == 1 and set(preds[0]) == {"boxes", "scores", "labels"}
    p = preds[0]
    assert p["boxes"].shape[1] == 6 and 0 < p["boxes"].shape[0] <= 100
    assert (p["boxes"] >= 0).all() and (p["boxes"] <= 32).all()
    assert (p["scores"][:-1] >= p["scores"][1:]).all() and set(p["labels"].tolist()) <= {0, 1}
    with_seg = det.predict_patch(image, return_seg=True)
    assert with_seg[0]["seg"].shape == (32, 32, 32)
    assert torch.equal(with_seg[0]["boxes"], p["boxes"].detach())
    # EMA / SWA wrappers deep-copy the model (incl. its sampling generator)
    clone = copy.deepcopy(det)
    assert torch.equal(clone.predict_patch(image)[0]["scores"], with_seg[0]["scores"])


def test_overfit_one_sphere(one_thread):
    torch.manual_seed(0)
    det = build_retina_unet(RESENC, arch_kwargs(), 1, 1, head_channels=16, seed=0)
    image, mask = sphere_patch()
    target = sphere_target(mask)
    opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        opt.zero_grad()
        losses = det(image, [target])
        losses["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    first = np.mean([h["loss"] for h in history[:3]])
    last = np.mean([h["loss"] for h in history[-3:]])
    assert last < 0.5 * first, (first, last)
    assert history[-1]["cls"] < history[0]["cls"] and history[-1]["seg_dice"] < history[0]["seg_dice"]
    det.eval()
    best = det.predict_patch(image)[0]
    assert box_iou(best["boxes"][:1], target["boxes"]).item() > 0.3


def test_focal_option_trains_all_anchors(one_thread):
    """cls_loss='focal' (small-budget option): dense loss over every anchor, loss falls on one sphere."""
    torch.manual_seed(0)
    det = build_retina_unet(RESENC, arch_kwargs(), 1, 1, head_channels=16, seed=0, cls_loss="focal")
    image, mask = sphere_patch()
    target = sphere_target(mask)
    opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    cls = []
    for _ in range(8):
        opt.zero_grad()
        losses = det(image, [target])
        losses["loss"].backward()
        opt.step()
        cls.append(losses["cls"].item())
    assert all(np.isfinite(cls)) and cls[-1] < cls[0]
    with pytest.raises(NnPreError, match="cls_loss"):
        build_retina_unet(RESENC, arch_kwargs(), 1, 1, cls_loss="softmax")


@pytest.mark.parametrize("cls_loss", ["bce", "focal"])
def test_sparse_training_outputs_equal_dense(one_thread, cls_loss):
    """The training forward evaluates the regressor at the sampled positives and (BCE) the classifier's gradient
    at the sampled anchors only; losses and gradients equal the dense heads' (what validation and inference run)."""
    torch.manual_seed(0)
    det = build_retina_unet(RESENC, arch_kwargs(), 1, 1, head_channels=16, seed=0, cls_loss=cls_loss)
    image, mask = sphere_patch()
    image = torch.cat([image, image.flip(2)])
    targets = [sphere_target(mask), sphere_target(mask[::-1].copy())]
    results = []
    for sparse in (False, True):
        det.zero_grad()
        out = det.head_outputs(image, sparse=sparse)
        assert (out["box_deltas"] is None) == sparse
        assert out["cls_logits"].requires_grad == (not sparse or cls_loss == "focal")
        losses = det.compute_loss(out, targets, torch.Generator().manual_seed(3))
        losses["loss"].backward()
        results.append((losses, {n: p.grad.clone() for n, p in det.named_parameters() if p.grad is not None}))
    (ld, gd), (ls, gs) = results
    assert ld["reg"] > 0 and ld["cls"] > 0
    for k in ld:
        assert torch.allclose(ld[k], ls[k], atol=1e-5), k
    assert gd.keys() == gs.keys()
    for n in gd:
        assert torch.allclose(gd[n], gs[n], atol=1e-4, rtol=1e-3), n
