"""VoCo: crop geometry, overlap targets (brute force), loss (nnssl VoCoLoss formulas), head, transfer."""
import copy
import itertools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from nnpre.errors import NnPreError
from nnpre_trainers.pretext import attach_conditioning, default_config, get_pretext
from nnpre_trainers.pretext.voco import base_crop_boxes, overlap_ratios, voco_loss

sys.path.insert(0, os.path.dirname(__file__))
from test_pretext_registry import blob_volumes, tiny_resenc  # noqa: E402


def test_defaults_are_nnssl_voco():
    c = default_config("voco")
    assert (c["region_size"], c["base_crops"], c["num_target_crops"], c["pred_weight"], c["reg_weight"],
            c["hidden_dim"], c["embed_dim"]) == ((256, 256, 64), (4, 4, 1), 4, 1.0, 1.0, 2048, 2048)
    t = get_pretext("voco")
    assert t.loader_patch_size([128, 128, 128]) == [256, 256, 64]
    assert t.network_patch_size([128, 128, 128]) == [64, 64, 64]  # nnssl's adaptation plan patch
    assert get_pretext("voco", region_size=None).loader_patch_size([64, 64, 32]) == [64, 64, 32]
    assert t.loader_augmentation() == "none"


def test_base_crops_tile_the_region():
    boxes = base_crop_boxes((16, 8, 4), (4, 2, 1))
    assert boxes.shape == (8, 3, 2)
    cover = torch.zeros(16, 8, 4)
    for b in boxes.tolist():
        cover[b[0][0]:b[0][1], b[1][0]:b[1][1], b[2][0]:b[2][1]] += 1
    assert torch.equal(cover, torch.ones_like(cover))
    assert boxes[1].tolist() == [[0, 4], [4, 8], [0, 4]]  # X slowest, Z fastest (nnssl order)


def test_overlap_targets_match_voxel_counting():
    task = get_pretext("voco", base_crops=(2, 2, 1), num_target_crops=8, crop_augment=False)
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 16 * 16 * 8, dtype=torch.float32).view(2, 1, 16, 16, 8)
    s = task.corrupt(x, g)
    assert s.input.shape == (2 * (4 + 8), 1, 8, 8, 8) and s.target.shape == (2, 8, 4)
    boxes = base_crop_boxes((16, 16, 8), (2, 2, 1))
    for b in range(2):
        for t, st in enumerate(s.extras["target_starts"][b].tolist()):
            crop = s.input[b * 12 + 4 + t, 0]
            assert torch.equal(crop, x[b, 0, st[0]:st[0] + 8, st[1]:st[1] + 8, st[2]:st[2] + 8])
            tmask = torch.zeros(16, 16, 8)
            tmask[st[0]:st[0] + 8, st[1]:st[1] + 8, st[2]:st[2] + 8] = 1
            for i, bx in enumerate(boxes.tolist()):
                ref = tmask[bx[0][0]:bx[0][1], bx[1][0]:bx[1][1], bx[2][0]:bx[2][1]].sum() / 512
                assert s.target[b, t, i] == pytest.approx(float(ref))
        for i, bx in enumerate(boxes.tolist()):
            assert torch.equal(s.input[b * 12 + i, 0], x[b, 0, bx[0][0]:bx[0][1], bx[1][0]:bx[1][1], bx[2][0]:bx[2][1]])
    assert torch.allclose(s.target.sum(-1), torch.ones(2, 8))  # base crops tile the region


def test_overlap_statistics_over_uniform_positions():
    """Uniform target positions: E[overlap with base crop i] = 1/N_b by symmetry of the tiling (4x4x1)."""
    task = get_pretext("voco", num_target_crops=64, crop_augment=False)
    s = task.corrupt(torch.zeros(4, 1, 32, 32, 8), torch.Generator().manual_seed(1))
    mean = s.target.mean(dim=(0, 1))
    assert s.target.shape == (4, 64, 16)
    # marginal of the 1-D overlap: corner crops are hit less often than central ones, but the total is 1/16
    assert float(mean.sum()) == pytest.approx(1.0)
    inner = mean.view(4, 4)[1:3, 1:3].mean()
    corner = mean.view(4, 4)[[0, 0, 3, 3], [0, 3, 0, 3]].mean()
    assert float(inner) > float(corner)
    starts = torch.tensor(list(itertools.product(range(25), range(25), [0])))
    exact = overlap_ratios(starts, (8, 8, 8), base_crop_boxes((32, 32, 8), (4, 4, 1))).mean(0)
    assert torch.allclose(mean, exact, atol=0.02)


def test_loss_matches_the_formulas_and_gradients_skip_detached_base():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, 16, generator=g, requires_grad=True)
    target = torch.randn(2, 3, 16, generator=g, requires_grad=True)
    ov = torch.rand(2, 3, 4, generator=g) * (torch.rand(2, 3, 4, generator=g) > 0.4)
    total, pred, reg = voco_loss(base, target, ov)
    sim = F.relu(F.cosine_similarity(base[:, None], target[:, :, None], dim=-1))
    pos = (ov > 0).float()
    ref_pred = ((-torch.log(1 - (ov - sim).abs() + 1e-6)) * ov).sum() / ov.sum() + \
        (sim ** 2 * (1 - pos)).sum() / (1 - pos + 1e-6).sum()
    bb = F.relu(F.cosine_similarity(base[:, None], base[:, :, None], dim=-1))
    ref_reg = torch.stack([bb[i][torch.triu_indices(4, 4, 1).unbind()].mean() for i in range(2)]).mean()
    assert torch.allclose(pred, ref_pred) and torch.allclose(reg, ref_reg) and torch.allclose(total, pred + reg)
    base.grad = None
    pred.backward()
    assert base.grad is None or float(base.grad.abs().sum()) == 0.0  # base embeddings detached in eq. 3
    assert float(target.grad.abs().sum()) > 0


def test_perfect_embeddings_give_low_loss():
    """Embeddings whose cosine similarities equal the overlaps (orthogonal base crops) -> near-zero loss."""
    ov = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    base = torch.eye(4)[None]
    target = ov / ov.norm(dim=-1, keepdim=True)
    total, pred, reg = voco_loss(base, target, ov)
    assert float(reg) == 0.0
    bad, _, _ = voco_loss(base, torch.flip(target, dims=[2]), ov)
    assert float(bad) > float(total) + 0.3


def test_step_head_and_transfer():
    task = get_pretext("voco", base_crops=(2, 2, 1), num_target_crops=2, hidden_dim=32, embed_dim=16)
    net = tiny_resenc(1, 1)
    dense = copy.deepcopy(net)
    attach_conditioning(net, task)
    x = blob_volumes(2, 16, seed=0)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    emb = task.forward(net, s)
    assert emb.shape == (2, 6, 16)
    loss = task.loss(emb, s)
    loss.backward()
    assert net.encoder.stem.convs[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in net.decoder.named_parameters() if not n.startswith("encoder."))
    enc = {k[len("encoder."):]: v for k, v in net.state_dict().items() if k.startswith("encoder.")}
    dense.encoder.load_state_dict(enc, strict=True)
    assert not any(k.startswith("encoder.") for k in net.nnpre_conditioning.state_dict())


def test_crop_augmentation_is_nnssls_seeded_and_leaves_global_rng_alone():
    import numpy as np

    task = get_pretext("voco", base_crops=(2, 2, 1), num_target_crops=4)
    plain = get_pretext("voco", base_crops=(2, 2, 1), num_target_crops=4, crop_augment=False)
    x = torch.randn(50, 1, 16, 16, 8, generator=torch.Generator().manual_seed(0))
    import random

    np.random.seed(1)
    random.seed(1)
    before = (np.random.random(), random.random())
    np.random.seed(1)
    random.seed(1)
    a = task.corrupt(x, torch.Generator().manual_seed(5))
    assert (np.random.random(), random.random()) == before  # batchgenerators ran on seeded, restored generators
    b = task.corrupt(x, torch.Generator().manual_seed(5))
    c = plain.corrupt(x, torch.Generator().manual_seed(5))
    assert torch.equal(a.input, b.input) and torch.equal(a.target, c.target)
    # a crop keeps its intensities (only mirrored / rotated) when none of the intensity transforms fired:
    # noise 0.9 x blur (0.2 x 0.5) 0.9 x brightness 0.85 x contrast 0.85 x low-res (0.1 x 0.5) 0.95 x gamma 0.9 x 0.7
    p_plain = 0.9 * 0.9 * 0.85 * 0.85 * 0.95 * 0.9 * 0.7
    kept = 0
    for i in range(a.input.shape[0]):
        variants = [torch.rot90(c.input[i].flip(list(f)) if f else c.input[i], k, dims=(1, 2))
                    for f in itertools.chain.from_iterable(itertools.combinations((1, 2, 3), n) for n in range(4))
                    for k in range(4)]
        kept += any(torch.allclose(a.input[i], v, atol=1e-6) for v in variants)
    n = a.input.shape[0]
    assert abs(kept / n - p_plain) < 4.5 * (p_plain * (1 - p_plain) / n) ** 0.5, (kept, n, p_plain)


def test_errors():
    with pytest.raises(NnPreError, match="not divisible"):
        get_pretext("voco").corrupt(torch.zeros(1, 1, 10, 8, 8), torch.Generator())
    with pytest.raises(NnPreError, match="divisible"):
        get_pretext("voco", region_size=(30, 32, 32))
    with pytest.raises(NnPreError, match="projection head"):
        t = get_pretext("voco", base_crops=(2, 1, 1))
        t.forward(tiny_resenc(1, 1), t.corrupt(torch.zeros(1, 1, 16, 8, 8), torch.Generator()))


def test_bf16_parallel_embeddings_give_a_finite_loss():
    """bf16 cosines of parallel embeddings round above 1 (to 1.0078); with a small positive overlap the unclamped
    ``-log(1 - |overlap - s|)`` would be the log of a negative number. The loss runs in float32 with cos <= 1."""
    g = torch.Generator().manual_seed(0)
    ov = torch.tensor([[[0.002, 0.998, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]])
    above_one = 0
    for _ in range(20):
        e = torch.randn(1, 1, 64, generator=g)
        base = torch.cat([e, torch.randn(1, 3, 64, generator=g)], dim=1).bfloat16().requires_grad_()
        target = e.repeat(1, 2, 1).bfloat16().requires_grad_()
        above_one += int((F.cosine_similarity(base[:, None], target[:, :, None], dim=-1) > 1).any())
        total, pred, reg = voco_loss(base, target, ov)
        assert total.dtype == torch.float32 and torch.isfinite(total)
        ref, _, _ = voco_loss(base.detach().float(), target.detach().float(), ov)
        assert float(total) == pytest.approx(float(ref), rel=1e-5)
        total.backward()
        assert torch.isfinite(target.grad).all() and torch.isfinite(base.grad).all()
    assert above_one > 0  # the edge case was hit
