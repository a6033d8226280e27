"""Adapters (nnpre_trainers.adapters): shapes, what trains, frozen tensors bit-identical after optimizer steps,
learning on tiny data, exact merge, safe state-dict round trip, DDP (gloo, 2 processes) for LoRA."""
import functools
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnpre.errors import NnPreError
from nnpre_trainers.adapters import (
    LoRAConv,
    MoLREConv,
    ProbeDecoder,
    adapter_from_dict,
    get_adapter,
    list_adapters,
    unique_named_parameters,
)

ALL = ("full", "lora", "molre", "probe-linear", "probe-mlp")
FREEZING = ("lora", "molre", "probe-linear", "probe-mlp")


def plain_unet(seed: int = 0, deep_supervision: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return PlainConvUNet(1, 3, (4, 8, 16), nn.Conv3d, 3, (1, 2, 2), 2, 3, (1, 1), conv_bias=True,
                         norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True, "eps": 1e-5},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)


def resenc_unet(seed: int = 0, deep_supervision: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return ResidualEncoderUNet(1, 3, (4, 8, 16), nn.Conv3d, 3, (1, 2, 2), (1, 2, 1), 3, (1, 1), conv_bias=True,
                               norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True, "eps": 1e-5},
                               nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                               deep_supervision=deep_supervision)


ARCHS = {"plain": plain_unet, "resenc": resenc_unet}


def tiny_data(seed: int = 0, n: int = 4):
    """x (n, 1, 16, 16, 16); label 1 where a smoothed x > 0.3, 2 where < -0.3, else 0 (learnable voxel-wise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, 16, generator=g)
    x = F.avg_pool3d(x, 3, 1, 1) * 3
    y = torch.zeros(n, 16, 16, 16, dtype=torch.long)
    y[x[:, 0] > 0.3] = 1
    y[x[:, 0] < -0.3] = 2
    return x, y


def encoder_snapshot(net):
    return {n: p.detach().clone() for n, p in unique_named_parameters(net) if n.startswith("encoder.")}


def randomize_adapters(net):
    """Give B / routers non-zero values so adapted outputs differ from the base network."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in unique_named_parameters(net):
            if ".lora_B." in n or ".router." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# -------------------------------------------------------------------------------------------------- registry
def test_registry_lists_all_modes_and_rejects_unknown_names_and_options():
    assert set(ALL) <= set(list_adapters())
    with pytest.raises(NnPreError, match="unknown adapter 'dora'.*lora"):
        get_adapter("dora")
    with pytest.raises(NnPreError, match="does not take"):
        get_adapter("full", rank=4)
    a = get_adapter("lora", rank=4, alpha=None)  # None keeps the default
    assert (a.rank, a.alpha) == (4, 8.0)
    b = adapter_from_dict(get_adapter("molre", rank=3, experts=2, layers=r"^encoder\.stages\.1").to_dict())
    assert b.to_dict() == {"name": "molre", "options": {"rank": 3, "alpha": 2.0, "layers": r"^encoder\.stages\.1",
                                                        "experts": 2}}
    assert adapter_from_dict(None).name == "full"
    with pytest.raises(NnPreError, match="--lora-rank"):
        get_adapter("lora", rank=0)


# -------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ALL)
def test_output_shapes_and_what_trains(arch, name):
    net = ARCHS[arch]()
    plain_count = sum(p.numel() for p in net.parameters())
    ad = get_adapter(name)
    ad.apply(net)
    x = torch.randn(2, 1, 16, 16, 16)
    assert net(x).shape == (2, 3, 16, 16, 16)
    named = dict(unique_named_parameters(net))
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == {n for n, _ in ad.trainable_named_parameters(net)}
    d = ad.describe(net)
    assert d["trainable"] == sum(named[n].numel() for n in trainable)
    assert d["total"] == sum(p.numel() for p in named.values())
    assert 0 < d["trainable_share"] <= 1
    if name == "full":
        assert d["trainable"] == d["total"] == plain_count and d["added"] == 0
    if name in ("lora", "molre"):
        wrapper = LoRAConv if name == "lora" else MoLREConv
        assert all(".lora_" in n or (name == "molre" and ".router." in n) or not n.startswith("encoder.")
                   for n in trainable)
        convs = [m for m in net.modules() if isinstance(m, wrapper)]
        assert convs and all(m.base.weight.requires_grad is False for m in convs)
        assert d["total"] == plain_count + d["added"]
        # the ConvDropoutNormReLU alias .all_modules.0 points at the same wrapper as .conv
        block = net.encoder.stages[0][0] if arch == "plain" else net.encoder.stem.convs[0]
        blk = block.convs[0] if arch == "plain" else block
        assert blk.conv is blk.all_modules[0] and isinstance(blk.conv, wrapper)
    if name.startswith("probe"):
        assert isinstance(net.decoder, ProbeDecoder)
        assert trainable and all(n.startswith("decoder.heads.") for n in trainable)
        assert not any(p.requires_grad for n, p in named.items() if n.startswith("encoder."))


def test_lora_added_parameter_count_is_rank_times_fan_in_plus_fan_out():
    net = plain_unet()
    convs = [m for n, m in net.named_modules() if n.startswith("encoder.") and isinstance(m, nn.Conv3d)]
    r = 2
    expected = sum(r * (c.in_channels * 27 + c.out_channels) for c in convs)
    ad = get_adapter("lora", rank=r)
    ad.apply(net)
    assert ad.describe(net)["added"] == expected
    molre = get_adapter("molre", rank=1, experts=3)
    net2 = plain_unet()
    molre.apply(net2)
    assert molre.describe(net2)["added"] == sum(3 * (c.in_channels * 27 + c.out_channels) + 3 * (c.in_channels + 1)
                                                for c in convs)


def test_probe_deep_supervision_returns_finest_first():
    net = plain_unet(deep_supervision=True)
    get_adapter("probe-linear").apply(net)
    outs = net(torch.randn(1, 1, 16, 16, 16))
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 16, 16), (8, 8, 8)]
    net.decoder.deep_supervision = False  # nnU-Net's set_deep_supervision_enabled flips this attribute
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_linear_probe_is_linear_in_the_encoder_features():
    net = plain_unet()
    get_adapter("probe-linear").apply(net)
    feats = [torch.randn(1, c, s, s, s) for c, s in zip((4, 8, 16), (16, 8, 4))]
    feats2 = [torch.randn_like(f) for f in feats]
    dec = net.decoder
    bias = dec([torch.zeros_like(f) for f in feats])
    lhs = dec([a + 2 * b for a, b in zip(feats, feats2)]) - bias
    rhs = (dec(feats) - bias) + 2 * (dec(feats2) - bias)
    assert torch.allclose(lhs, rhs, atol=1e-5)


def test_layer_pattern_selects_and_errors_are_one_line():
    net = plain_unet()
    get_adapter("lora", layers=r"^encoder\.stages\.2\.").apply(net)
    wrapped = {n for n, m in net.named_modules() if isinstance(m, LoRAConv)}
    assert wrapped and all(n.startswith("encoder.stages.2.") or n.startswith("decoder.encoder.stages.2.")
                           for n in wrapped)
    for pattern, msg in ((r"^nothing", "matches no convolution"), (r"seg_layers", "outside the encoder"),
                         (r"([", "not a valid regular expression")):
        with pytest.raises(NnPreError, match=msg):
            get_adapter("lora", layers=pattern).apply(plain_unet())
    with pytest.raises(NnPreError, match="already carries"):
        get_adapter("lora").apply(net)


# -------------------------------------------------------------------------------------------------- training
def _train(net, ad, steps: int = 25, lr: float = 1e-2):
    x, y = tiny_data()
    opt = torch.optim.AdamW(ad.trainable_parameters(net), lr=lr, weight_decay=1e-2)
    losses = []
    net.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@functools.lru_cache(maxsize=None)
def pretrained_encoder(arch: str):
    """Encoder weights after 30 full-training steps on other tiny data (stands in for a pretrained encoder)."""
    net = ARCHS[arch](seed=1)
    x, y = tiny_data(seed=11)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items() if k.startswith("encoder.")}


def chance_loss(y: torch.Tensor) -> float:
    """Cross-entropy of the best constant prediction (the label frequencies' entropy)."""
    f = torch.bincount(y.flatten(), minlength=3).double() / y.numel()
    return float(-(f[f > 0] * f[f > 0].log()).sum())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ALL)
def test_frozen_tensors_bit_identical_and_loss_decreases(arch, name):
    net = ARCHS[arch]()
    net.load_state_dict(pretrained_encoder(arch), strict=False)  # encoder-only transfer, random decoder
    ad = get_adapter(name)
    ad.apply(net)
    before = encoder_snapshot(net)
    trainable_before = {n: p.detach().clone() for n, p in ad.trainable_named_parameters(net)}
    losses = _train(net, ad, steps=25, lr=3e-2)
    after = dict(unique_named_parameters(net))
    frozen = [n for n in before if not ad.is_trainable(n)]
    if name == "full":
        assert not frozen
    else:
        assert frozen and all(torch.equal(before[n], after[n]) for n in frozen), "a frozen encoder tensor moved"
        assert all(n in trainable_before for n in after if not n.startswith("encoder.") or ad.is_added(n))
    # every trainable tensor that takes part in the forward pass moved (without deep supervision nnU-Net's
    # lower-resolution seg layers get no gradient)
    used = {n for n in trainable_before if after[n].grad is not None}
    moved = {n for n in used if not torch.equal(trainable_before[n], after[n])}
    assert used and moved == used, f"trainable tensors that never moved: {sorted(used - moved)[:3]}"
    assert all(n.startswith("decoder.seg_layers.") for n in set(trainable_before) - used)
    # the tiny task is learnable from the "pretrained" features: the loss ends well below chance (≈ 1.08)
    assert min(losses[-5:]) < 0.75 * chance_loss(tiny_data()[1]) < losses[0], losses


def test_molre_routing_is_input_dependent_after_training():
    net = plain_unet()
    ad = get_adapter("molre")
    ad.apply(net)
    _train(net, ad, steps=15)
    conv = next(m for m in net.modules() if isinstance(m, MoLREConv))
    net.eval()
    x, _ = tiny_data(seed=3)
    with torch.no_grad():
        net(torch.cat([x[:1], -3 * x[1:2] + 1.0]))
    g = conv.last_gates
    assert g.shape == (2, 4) and torch.allclose(g.sum(1), torch.ones(2))
    assert not torch.allclose(g[0], g[1]), "both inputs were routed identically"
    assert not torch.allclose(conv.gate_mean, torch.full((4,), 0.25))  # running mean moved with training


# -------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ("full", "lora"))
def test_merged_outputs_equal_unmerged_and_keys_are_plain(arch, name):
    plain = ARCHS[arch]()
    keys = list(plain.state_dict())
    net = ARCHS[arch]()
    ad = get_adapter(name, **({"rank": 3, "alpha": 6.0} if name == "lora" else {}))
    ad.apply(net)
    randomize_adapters(net)
    net.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        y = net(x)
        if name == "lora":
            assert (y - plain.eval()(x)).abs().max() > 1e-3  # the adapter really changes the output
        ad.merge(net)
        assert list(net.state_dict()) == keys
        assert not any(isinstance(m, LoRAConv) for m in net.modules())
        assert (net(x) - y).abs().max() < 1e-5
        fresh = ARCHS[arch](seed=5).eval()
        fresh.load_state_dict(net.state_dict())  # strict: loads into the plain architecture
        assert (fresh(x) - y).abs().max() < 1e-5


def test_molre_merge_refuses_unless_approximate_and_is_exact_for_constant_routing():
    net = plain_unet()
    ad = get_adapter("molre", rank=2, experts=3)
    ad.apply(net)
    randomize_adapters(net)
    with pytest.raises(NnPreError, match="cannot be folded exactly"):
        ad.merge(net)
    keys = list(plain_unet().state_dict())
    with torch.no_grad():  # input-independent routing (router weight 0): the approximate merge is then exact
        for m in net.modules():
            if isinstance(m, MoLREConv):
                m.router.weight.zero_()
                m.gate_mean.copy_(torch.softmax(m.router.bias, 0))
    net.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        y = net(x)
        ad.merge(net, approximate=True)
        assert list(net.state_dict()) == keys
        assert (net(x) - y).abs().max() < 1e-5


def test_probe_merge_refuses_for_segmentation():
    net = plain_unet()
    ad = get_adapter("probe-mlp")
    ad.apply(net)
    with pytest.raises(NnPreError, match="not the plain nnU-Net architecture"):
        ad.merge(net)


class _TinyDetector(nn.Module):
    """Stand-in for the Retina U-Net: encoder + linear decoder + heads declared by ``head_prefixes``."""

    head_prefixes = ("classifier.",)

    def __init__(self):
        super().__init__()
        self.encoder = plain_unet().encoder
        self.decoder = nn.Conv3d(4, 4, 1)
        self.classifier = nn.Conv3d(4, 2, 1)


def test_probes_on_detectors_freeze_the_encoder_only():
    det = _TinyDetector()
    ad = get_adapter("probe-linear")
    ad.apply(det)
    trainable = {n for n, p in det.named_parameters() if p.requires_grad}
    assert trainable == {"decoder.weight", "decoder.bias", "classifier.weight", "classifier.bias"}
    keys = list(det.state_dict())
    ad.merge(det)  # nothing was added: a no-op
    assert list(det.state_dict()) == keys
    with pytest.raises(NnPreError, match="use --adapter probe-linear"):
        get_adapter("probe-mlp").apply(_TinyDetector())


# -------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ("lora", "molre", "probe-linear"))
def test_unmerged_state_dict_round_trips_with_weights_only(tmp_path, name):
    net = resenc_unet()
    ad = get_adapter(name)
    ad.apply(net)
    _train(net, ad, steps=2)
    path = tmp_path / "adapted.pth"
    torch.save({"network_weights": net.state_dict(), "nnpre_adapter": ad.to_dict()}, path)
    ck = torch.load(path, weights_only=True, map_location="cpu")
    fresh = resenc_unet(seed=9)
    ad2 = adapter_from_dict(ck["nnpre_adapter"])
    ad2.apply(fresh)
    fresh.load_state_dict(ck["network_weights"])  # strict
    net.eval()
    fresh.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), fresh(x))


# -------------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = plain_unet(seed=0)
        ad = get_adapter("lora", rank=2)
        ad.apply(net)
        before = encoder_snapshot(net)
        # frozen parameters (requires_grad=False) are not synchronised; the low-resolution seg layer is unused
        # without deep supervision (as in nnpre_trainers.base)
        ddp = DDP(net, find_unused_parameters=True)
        opt = torch.optim.SGD(ad.trainable_parameters(ddp), lr=0.05, momentum=0.9)
        x, y = tiny_data(seed=rank, n=2)  # different data per rank: only gradient averaging keeps them equal
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        after = dict(unique_named_parameters(net))
        frozen_ok = all(torch.equal(before[n], after[n]) for n in before if not ad.is_trainable(n))
        flat = torch.cat([p.detach().flatten() for _, p in ad.trainable_named_parameters(net)])
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        lora_moved = any(not torch.equal(before[n], after[n]) for n in before if ad.is_added(n))
        torch.save({"frozen_ok": frozen_ok, "ranks_equal": all(torch.equal(gathered[0], g) for g in gathered),
                    "lora_moved": lora_moved}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_lora_under_ddp_gloo_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert r == {"frozen_ok": True, "ranks_equal": True, "lora_moved": True}, (rank, r)


# -------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_merge_equals_module_merge(arch):
    from nnpre_trainers.adapters.export import merge_state_dict, merged_checkpoint

    net = ARCHS[arch]()
    ad = get_adapter("lora", rank=2, alpha=5.0)
    ad.apply(net)
    randomize_adapters(net)
    ck = {"network_weights": net.state_dict(), "nnpre_adapter": ad.to_dict(), "optimizer_state": {},
          "trainer_name": "nnPreFineTuneTrainer"}
    out = merged_checkpoint(ck)
    assert "optimizer_state" not in out and out["trainer_name"] == "nnPreFineTuneTrainer"
    assert out["nnpre_adapter_merged"]["approximate"] is False
    ad.merge(net)
    ref = net.state_dict()
    assert list(out["network_weights"]) == list(ref) == list(ARCHS[arch]().state_dict())
    assert all((out["network_weights"][k] - ref[k]).abs().max() < 1e-6 for k in ref)
    with pytest.raises(NnPreError, match="no adapter record"):
        merged_checkpoint({"network_weights": ref})
    assert merge_state_dict(ref, {"name": "full"}) == ref


def test_state_dict_merge_of_molre_and_probes():
    from nnpre_trainers.adapters.export import merge_state_dict

    net = plain_unet()
    ad = get_adapter("molre", experts=2)
    ad.apply(net)
    randomize_adapters(net)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, MoLREConv):
                m.gate_mean.copy_(torch.tensor([0.3, 0.7]))
    sd = net.state_dict()
    with pytest.raises(NnPreError, match="--approximate-molre"):
        merge_state_dict(sd, ad.to_dict())
    approx = merge_state_dict(sd, ad.to_dict(), approximate=True)
    ad.merge(net, approximate=True)
    assert list(approx) == list(net.state_dict())
    assert all(torch.allclose(approx[k], v, atol=1e-6) for k, v in net.state_dict().items())
    probe_net = plain_unet()
    probe = get_adapter("probe-linear")
    probe.apply(probe_net)
    with pytest.raises(NnPreError, match="not the plain nnU-Net architecture"):
        merge_state_dict(probe_net.state_dict(), probe.to_dict())
