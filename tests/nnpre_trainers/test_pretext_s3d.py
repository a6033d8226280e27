"""S3D (sparse masked modelling): mask statistics, sparsity through the encoder, densify, transfer."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnpre.errors import NnPreError
from nnpre_trainers.pretext import attach_conditioning, get_pretext
from nnpre_trainers.pretext.s3d import SparkDensify, SparseMaskContext, sparse_instance_norm

sys.path.insert(0, os.path.dirname(__file__))
from test_pretext_registry import blob_volumes, tiny_resenc  # noqa: E402


def _setup(block=4, **cfg):
    task = get_pretext("s3d", block_size=block, **cfg)
    net = tiny_resenc(1, 1)
    dense = copy.deepcopy(net)
    attach_conditioning(net, task)
    return task, net, dense


def test_defaults_are_nnssl_spark():
    c = get_pretext("s3d").config
    assert (c.mask_ratio, c.block_size, c.mask_token) == (0.75, 16, True)


def test_mask_ratio_per_sample_and_loss_mask():
    task = get_pretext("s3d", block_size=4)
    x = torch.randn(6, 1, 32, 32, 32)
    s = task.corrupt(x, torch.Generator().manual_seed(1))
    vis = s.extras["visible"]
    # 8³ blocks, floor(0.75 * 512) = 384 masked in every sample, block aligned
    coarse = vis[:, 0, ::4, ::4, ::4]
    assert torch.equal((coarse == 0).flatten(1).sum(1), torch.full((6,), 384))
    assert torch.equal(vis, coarse.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)[:, None])
    assert torch.equal(s.loss_mask, 1 - vis)
    assert torch.equal(s.input, x * vis) and torch.equal(s.target, x)
    assert not torch.equal(s.extras["visible"][0], s.extras["visible"][1])


def test_masked_positions_stay_empty_through_every_encoder_layer():
    task, net, _ = _setup()
    x = blob_volumes(2, 32, seed=0)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    ctx = net.nnpre_conditioning.ctx
    seen = []

    def check(mod, inp, out):
        m = ctx.at(out)
        seen.append(type(mod).__name__)
        assert float((out * (1 - m)).abs().max()) == 0.0, type(mod).__name__

    torch.set_grad_enabled(False)
    handles = [m.register_forward_hook(check) for m in net.encoder.modules()
               if isinstance(m, (nn.Conv3d, nn.InstanceNorm3d, nn.AvgPool3d, nn.LeakyReLU))]
    ctx.set(s.extras["visible"])
    try:
        feats = net.encoder(s.input)
    finally:
        ctx.set(None)
        for h in handles:
            h.remove()
        torch.set_grad_enabled(True)
    assert {"SparseConv3d", "SparseInstanceNorm3d", "SparseAvgPool3d"} <= set(seen)
    # levels: stride 1, 2, 4 (block 4: sparse); stride 8 > block: dense (as nnssl)
    ctx.set(s.extras["visible"])
    fracs = [float(ctx.at(f).mean()) for f in feats]
    ctx.set(None)
    assert fracs[:3] == [pytest.approx(0.25)] * 3 and fracs[3] == 1.0


def test_sparse_instance_norm_uses_visible_statistics_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, 8, generator=g) * 3 + 1
    m = (torch.rand(2, 1, 8, 8, 8, generator=g) > 0.6).float()
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    y = sparse_instance_norm(x, m, w, b, 1e-5)
    for i in range(2):
        sel = m[i, 0] > 0
        vals = x[i][:, sel]  # (C, L) visible values
        ref = F.instance_norm(vals[None], eps=1e-5)[0] * w[:, None] + b[:, None]
        assert torch.allclose(y[i][:, sel], ref, atol=1e-5)
        assert float(y[i][:, ~sel].abs().max()) == 0.0
    # changing masked values does not change anything
    x2 = torch.where(m > 0, x, torch.randn_like(x) * 100)
    assert torch.allclose(sparse_instance_norm(x2, m, w, b, 1e-5), y, atol=1e-5)


def test_mask_input_option_controls_the_stem_leak():
    """SparK (default) feeds the masked image; nnssl (mask_input=False) feeds the clean one, so visible voxels
    next to a masked block see hidden intensities through the stem kernel. Masked positions stay empty in both."""
    x = blob_volumes(1, 32, seed=1)
    perturbed = {}
    for mask_input in (True, False):
        task, net, _ = _setup(mask_input=mask_input)
        s = task.corrupt(x, torch.Generator().manual_seed(3))
        vis = s.extras["visible"]
        s2 = copy.copy(s)
        s2.input = s.input + (1 - vis) * torch.randn_like(x) if not mask_input else s.input
        ctx = net.nnpre_conditioning.ctx
        with torch.no_grad():
            ctx.set(vis)
            a, b = net.encoder(s.input), net.encoder(s2.input)
            ctx.set(None)
        perturbed[mask_input] = not all(torch.equal(i, j) for i, j in zip(a, b))
        assert float((a[0] * (1 - vis)).abs().max()) == 0.0
        assert torch.equal(s.input, x * vis) == mask_input
    assert perturbed == {True: False, False: True}


def test_densify_fills_tokens_and_decoder_gets_dense_features():
    task, net, _ = _setup()
    dens = net.nnpre_conditioning
    assert isinstance(dens, SparkDensify)
    assert isinstance(dens.projs[0], nn.Identity) and all(isinstance(p, nn.Conv3d) for p in dens.projs[1:])
    assert all(float(t.abs().max()) <= 0.02 and float(t.abs().max()) > 0 for t in dens.mask_tokens)
    ctx = SparseMaskContext(4)
    dens.ctx = ctx
    feats = [torch.zeros(1, c, 32 // 2 ** i, 32 // 2 ** i, 32 // 2 ** i) for i, c in enumerate([4, 8, 16, 32])]
    vis = torch.zeros(1, 1, 32, 32, 32)
    vis[..., :16, :, :] = 1
    ctx.set(vis)
    with torch.no_grad():
        dens.projs[1].weight.zero_()
        dens.projs[1].bias.zero_()
        out = dens(feats)
    assert torch.allclose(out[0][0, :, 20, 5, 5], dens.mask_tokens[0][0, :, 0, 0, 0])
    assert float(out[0][0, :, 3, 5, 5].abs().max()) == 0.0  # visible: normalised zeros stay zero
    assert float(out[1].abs().max()) == 0.0  # zeroed projection


def test_step_trains_tokens_encoder_and_decoder_then_transfers_to_a_dense_encoder():
    task, net, dense = _setup()
    x = blob_volumes(2, 32, seed=2)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    loss = task.loss(task.forward(net, s), s)
    loss.backward()
    assert net.nnpre_conditioning.mask_tokens[1].grad.abs().sum() > 0
    assert net.encoder.stem.convs[0].conv.weight.grad.abs().sum() > 0
    assert net.decoder.seg_layers[-1].weight.grad.abs().sum() > 0
    assert net.nnpre_conditioning.ctx.visible is None  # cleared after the forward
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    enc = {k[len("encoder."):]: v for k, v in net.state_dict().items() if k.startswith("encoder.")}
    assert set(enc) == set(dense.encoder.state_dict())
    dense.encoder.load_state_dict(enc, strict=True)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(net.encoder(x), dense.encoder(x)))


def test_plain_unet_and_errors():
    task = get_pretext("s3d", block_size=4)
    net = PlainConvUNet(1, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], 2, 1, [1, 1], conv_bias=True,
                        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)
    attach_conditioning(net, task)
    s = task.corrupt(torch.randn(1, 1, 16, 16, 16), torch.Generator().manual_seed(0))
    assert task.forward(net, s).shape == (1, 1, 16, 16, 16)
    with pytest.raises(NnPreError, match="densify module"):
        task.forward(tiny_resenc(1, 1), s)
    bn = PlainConvUNet(1, 2, [4, 8], nn.Conv3d, 3, [1, 2], 1, 1, [1], norm_op=nn.BatchNorm3d, nonlin=nn.ReLU)
    with pytest.raises(NnPreError, match="instance norm"):
        attach_conditioning(bn, task)
    with pytest.raises(NnPreError, match="mask_ratio"):
        get_pretext("s3d", mask_ratio=1.5)
