"""MAE pretext: blocky mask ratio and alignment, corruption, masked-only loss (nnssl semantics)."""
import math

import pytest
import torch

from nnpre.errors import NnPreError
from nnpre_trainers.pretext import get_pretext
from nnpre_trainers.pretext.mae import block_mask, num_masked_blocks


def _blocks(mask: torch.Tensor, b: int) -> torch.Tensor:
    """(B, 1, X, Y, Z) mask -> (B, gx, gy, gz) value of each block's first voxel, after checking constancy."""
    B, _, X, Y, Z = mask.shape
    grid = [math.ceil(s / b) for s in (X, Y, Z)]
    out = torch.empty(B, *grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                blk = mask[:, 0, i * b:(i + 1) * b, j * b:(j + 1) * b, k * b:(k + 1) * b]
                assert torch.all(blk == blk[:, :1, :1, :1]), "mask not constant inside a block"
                out[:, i, j, k] = blk[:, 0, 0, 0]
    return out


def test_mask_ratio_exact_and_block_aligned():
    g = torch.Generator().manual_seed(0)
    mask = block_mask(3, (32, 32, 32), 8, 0.75, g)
    assert mask.shape == (3, 1, 32, 32, 32) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    blocks = _blocks(mask, 8)
    # 64 blocks, exactly int(0.75 * 64) = 48 masked (0 = masked) in every sample
    assert ((blocks == 0).flatten(1).sum(1) == 48).all()
    assert torch.allclose((mask == 0).float().flatten(1).mean(1), torch.full((3,), 0.75))
    # masks are drawn per sample
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[1], mask[2])


def test_mask_non_divisible_patch_uses_ceil_grid_then_crop():
    g = torch.Generator().manual_seed(1)
    mask = block_mask(2, (20, 24, 17), 8, 0.75, g)
    assert mask.shape == (2, 1, 20, 24, 17)
    blocks = _blocks(mask, 8)  # grid 3 x 3 x 3 = 27 blocks, partial blocks at the far faces
    assert blocks.shape[1:] == (3, 3, 3)
    assert ((blocks == 0).flatten(1).sum(1) == num_masked_blocks(27, 0.75)).all()
    assert num_masked_blocks(27, 0.75) == 20 and num_masked_blocks(100, 0.29) == 29


def test_mask_ratio_over_many_draws_is_uniform_over_blocks():
    g = torch.Generator().manual_seed(2)
    mask = block_mask(400, (16, 16, 16), 8, 0.5, g)
    blocks = _blocks(mask, 8).flatten(1)  # (400, 8)
    freq = (blocks == 0).float().mean(0)  # each block masked with probability 0.5
    assert torch.all((freq - 0.5).abs() < 4.5 * math.sqrt(0.25 / 400)), freq


def test_corrupt_zero_fill_and_targets():
    task = get_pretext("mae", block_size=8)
    x = torch.randn(2, 2, 16, 16, 24)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    assert s.input.shape == x.shape and torch.equal(s.target, x)
    assert s.loss_mask.shape == (2, 1, 16, 16, 24)
    masked = s.loss_mask.expand_as(x) == 1
    assert torch.all(s.input[masked] == 0) and torch.equal(s.input[~masked], x[~masked])
    assert task.num_output_channels(2) == 2 and task.num_extra_input_channels() == 0


def test_corrupt_noise_fill():
    task = get_pretext("mae", block_size=8, fill="noise")
    x = torch.randn(2, 1, 16, 16, 16)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    masked = s.loss_mask.expand_as(x) == 1
    assert torch.equal(s.input[~masked], x[~masked])
    assert not torch.any(s.input[masked] == x[masked])
    assert 0.7 < s.input[masked].std() < 1.3  # standard normal fill


def test_corrupt_is_deterministic_given_generator():
    task = get_pretext("mae", block_size=4)
    x = torch.randn(2, 1, 16, 16, 16)
    a = task.corrupt(x, torch.Generator().manual_seed(5))
    b = task.corrupt(x, torch.Generator().manual_seed(5))
    c = task.corrupt(x, torch.Generator().manual_seed(6))
    assert torch.equal(a.input, b.input) and torch.equal(a.loss_mask, b.loss_mask)
    assert not torch.equal(a.loss_mask, c.loss_mask)


def test_loss_counts_only_masked_voxels():
    task = get_pretext("mae", block_size=8)
    x = torch.randn(2, 1, 16, 16, 16)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    pred = torch.randn_like(x)
    base = task.loss(pred, s)
    visible = s.loss_mask.expand_as(x) == 0
    changed_visible = pred.clone()
    changed_visible[visible] += 10.0
    assert torch.allclose(task.loss(changed_visible, s), base)
    changed_masked = pred.clone()
    changed_masked[~visible] += 10.0
    assert not torch.allclose(task.loss(changed_masked, s), base)
    # nnssl MAEMSELoss: sum((out - x)^2 * (1 - mask)) / sum(1 - mask)
    m = s.loss_mask
    assert torch.allclose(base, ((pred - x) ** 2 * m).sum() / m.sum())
    # gradient is zero on visible voxels
    p = pred.clone().requires_grad_(True)
    task.loss(p, s).backward()
    assert torch.all(p.grad[visible] == 0) and torch.any(p.grad[~visible] != 0)


def test_loss_with_nothing_masked_is_zero_not_nan():
    task = get_pretext("mae", mask_ratio=0.0, block_size=8)
    x = torch.randn(1, 1, 16, 16, 16)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    assert torch.equal(s.input, x)
    assert task.loss(torch.randn_like(x), s).item() == 0.0


def test_preview_and_bad_inputs():
    task = get_pretext("mae", block_size=8)
    x = torch.randn(2, 1, 16, 16, 16)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    prev = task.preview(s, torch.zeros_like(x))
    assert {"input", "corrupted", "prediction", "target"} <= set(prev)
    assert all(v.shape == (16, 16, 16) for v in prev.values())
    with pytest.raises(NnPreError, match="B, C, X, Y, Z"):
        task.corrupt(torch.randn(1, 16, 16, 16), torch.Generator())
    with pytest.raises(NnPreError, match="mask_ratio"):
        get_pretext("mae", mask_ratio=1.5)
    with pytest.raises(NnPreError, match="fill"):
        get_pretext("mae", fill="token")
