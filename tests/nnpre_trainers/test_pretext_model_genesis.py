"""Model Genesis pretext: official rates, range contract, flips on the target, shuffle statistics vs the loop."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nnpre_trainers.pretext import get_pretext
from nnpre_trainers.pretext.model_genesis import (
    ModelGenesisConfig,
    apply_flips,
    apply_intensity_curve,
    brick_layout,
    in_painting,
    local_pixel_shuffle,
    max_window_sides,
    model_genesis_pair,
    out_painting,
    random_flip_axes,
    random_intensity_curve,
)

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_model_genesis.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_model_genesis", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _within_binomial(count: int, n: int, p: float, k: float = 4.5) -> bool:
    return abs(count / n - p) <= k * math.sqrt(p * (1 - p) / n)


def test_corruption_probabilities_match_official_rates():
    cfg = ModelGenesisConfig(bezier_points=2000, num_windows=20)  # cheap, same rates
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 12, 12, 12)).astype(np.float32)
    n = 3000
    rec = {k: [] for k in ("flips", "local_shuffle", "nonlinear", "inverted", "inpaint", "outpaint")}
    for _ in range(n):
        _, _, applied = model_genesis_pair(x, rng, cfg)
        for k in rec:
            rec[k].append(applied[k])
    rec = {k: np.array(v) for k, v in rec.items()}
    flips = rec["flips"]
    assert flips.max() <= 3
    assert _within_binomial((flips >= 1).sum(), n, 0.4)  # flip_rate 0.4
    assert _within_binomial((flips >= 2).sum(), n, 0.4 ** 2)
    assert _within_binomial((flips == 3).sum(), n, 0.4 ** 3)
    assert _within_binomial(rec["local_shuffle"].sum(), n, 0.5)  # local_rate
    assert _within_binomial(rec["nonlinear"].sum(), n, 0.9)  # nonlinear_rate
    nl = rec["nonlinear"] == 1
    assert _within_binomial(rec["inverted"][nl].sum(), nl.sum(), 0.5)  # half of the curves invert
    assert not rec["inverted"][~nl].any()
    assert _within_binomial(rec["inpaint"].sum(), n, 0.9 * 0.2)  # paint 0.9 x inpaint 0.2
    assert _within_binomial(rec["outpaint"].sum(), n, 0.9 * 0.8)
    assert not (rec["inpaint"] & rec["outpaint"]).any()


def test_task_records_applied_corruptions_per_sample():
    task = get_pretext("model_genesis", bezier_points=1000)
    x = torch.randn(3, 1, 16, 16, 16)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    assert s.loss_mask is None and s.input.shape == x.shape and s.target.shape == x.shape
    for k in ("flips", "local_shuffle", "nonlinear", "inverted", "inpaint", "outpaint"):
        assert s.extras[f"mg_{k}"].shape == (3,) and s.extras[f"mg_{k}"].dtype == torch.long
    assert s.input.dtype == torch.float32 and s.target.dtype == torch.float32


def test_input_stays_in_patch_range_per_channel():
    rng = np.random.default_rng(1)
    cfg = ModelGenesisConfig(bezier_points=2000, local_rate=1.0, nonlinear_rate=1.0, paint_rate=1.0)
    for i in range(40):
        x = rng.standard_normal((2, 20, 20, 20)).astype(np.float32)
        x[1] = x[1] * 50 + 300  # a channel with a very different range
        inp, tgt, applied = model_genesis_pair(x, rng, cfg)
        assert applied["local_shuffle"] and applied["nonlinear"] and (applied["inpaint"] or applied["outpaint"])
        lo, hi = tgt.min(axis=(1, 2, 3)), tgt.max(axis=(1, 2, 3))
        assert np.allclose(lo, x.min(axis=(1, 2, 3))) and np.allclose(hi, x.max(axis=(1, 2, 3)))
        tol = 1e-5 * (hi - lo)
        assert np.all(inp.min(axis=(1, 2, 3)) >= lo - tol) and np.all(inp.max(axis=(1, 2, 3)) <= hi + tol)
        assert np.isfinite(inp).all()


def test_constant_patch_gives_finite_output():
    rng = np.random.default_rng(2)
    x = np.full((1, 16, 16, 16), -0.7, dtype=np.float32)
    cfg = ModelGenesisConfig(bezier_points=1000, nonlinear_rate=1.0, paint_rate=1.0)
    for _ in range(5):
        inp, tgt, _ = model_genesis_pair(x, rng, cfg)
        assert np.isfinite(inp).all() and np.all(tgt == -0.7)


def test_flips_are_applied_to_input_and_target():
    assert random_flip_axes(np.random.default_rng(0), 1.0, 3).__len__() == 3
    assert random_flip_axes(np.random.default_rng(0), 0.0, 3) == []
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 6, 7, 8)).astype(np.float32)
    flips_only = ModelGenesisConfig(flip_rate=1.0, local_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0)
    combos = [apply_flips(x, [a for a in range(3) if m >> a & 1]) for m in range(8)]
    seen = set()
    for _ in range(30):
        inp, tgt, applied = model_genesis_pair(x, rng, flips_only)
        assert applied["flips"] == 3
        assert np.array_equal(inp, tgt)  # nothing but the flips: input == target
        match = [i for i, c in enumerate(combos) if np.array_equal(tgt, c)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 2  # the target really gets flipped, along different axes


def test_corrupt_is_deterministic_given_generator():
    task = get_pretext("model_genesis", bezier_points=1000)
    x = torch.randn(2, 1, 20, 20, 20)
    a = task.corrupt(x, torch.Generator().manual_seed(7))
    b = task.corrupt(x, torch.Generator().manual_seed(7))
    c = task.corrupt(x, torch.Generator().manual_seed(8))
    assert torch.equal(a.input, b.input) and torch.equal(a.target, b.target)
    assert all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)
    assert not torch.equal(a.input, c.input)


def test_loss_is_whole_volume_mse():
    task = get_pretext("model_genesis", bezier_points=1000)
    x = torch.randn(2, 1, 16, 16, 16)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    pred = torch.randn_like(x)
    assert torch.allclose(task.loss(pred, s), torch.nn.functional.mse_loss(pred, s.target))
    prev = task.preview(s, pred)
    assert {"input", "corrupted", "prediction", "target"} <= set(prev)


# -- local pixel shuffling ----------------------------------------------------------------------------------
def _unique_patch(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.permutation(int(np.prod(shape))).astype(np.float32).reshape(shape)  # value = identity of a voxel


def _pooled_displacements(bench, x, fn, rng, n):
    """Changed fraction per patch and the pooled |displacement| of changed voxels per axis over ``n`` patches."""
    fractions, pooled = [], []
    for _ in range(n):
        changed, d = bench.displacements(x, fn(x, rng))
        fractions.append(changed.mean())
        pooled.append(d[:, changed])
    return np.array(fractions), np.concatenate(pooled, axis=1)


@pytest.mark.parametrize("shape", [(1, 30, 30, 20), (1, 60, 40, 50)])  # window sides up to 3x3x2 / 6x4x5
def test_shuffle_statistics_match_the_official_loop(shape):
    bench = _bench()
    x = _unique_patch(shape, 0)
    ours_fr, ours_d = _pooled_displacements(bench, x, local_pixel_shuffle, np.random.default_rng(1), 12)
    ref_fr, ref_d = _pooled_displacements(bench, x, bench.local_pixel_shuffle_loop, np.random.default_rng(2), 12)
    assert abs(ours_fr.mean() - ref_fr.mean()) < 0.02, (ours_fr.mean(), ref_fr.mean())
    sides = max_window_sides(shape[1:])
    for axis in range(3):  # per-axis distribution of |source - destination| over changed voxels
        h_ours = np.bincount(ours_d[axis], minlength=sides[axis]) / ours_d.shape[1]
        h_ref = np.bincount(ref_d[axis], minlength=sides[axis]) / ref_d.shape[1]
        assert len(h_ours) == sides[axis]  # never moves max side or farther
        assert 0.5 * np.abs(h_ours - h_ref).sum() < 0.04, (axis, h_ours, h_ref)  # total variation distance
        assert abs(ours_d[axis].mean() - ref_d[axis].mean()) < 0.04 * ref_d[axis].mean() + 0.01


@pytest.mark.parametrize("shape,x_perms", [((2, 40, 30, 20), 2), ((1, 12, 40, 30), 2), ((1, 30, 24, 40), 1)])
def test_shuffle_is_local_and_keeps_values_and_range(shape, x_perms):
    x = _unique_patch(shape, 4)
    out = local_pixel_shuffle(x, np.random.default_rng(4), x_perms=x_perms)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= x.min() and out.max() <= x.max()
    # every output value exists in the input, at most (max side - 1) voxels away, same channel
    sides = max_window_sides(shape[1:])
    flat = x.reshape(-1)
    order = np.argsort(flat)
    src = order[np.searchsorted(flat[order], out.reshape(-1))]
    assert np.array_equal(flat[src], out.reshape(-1))
    src_c = np.stack(np.unravel_index(src, shape))
    dst_c = np.stack(np.unravel_index(np.arange(flat.size), shape))
    assert np.array_equal(src_c[0], dst_c[0])  # channels never mix
    assert np.all(np.abs(src_c[1:] - dst_c[1:]) <= (sides - 1)[:, None])
    assert (out != x).mean() > 0.5
    assert np.array_equal(np.sort(src), np.arange(flat.size))  # documented: a permutation, no value repeated


@pytest.mark.parametrize("num_windows", [10_000, 40])
def test_shuffled_bricks_are_permutations_of_their_voxels(num_windows):
    shape = (2, 40, 30, 20)
    for seed in range(3):
        x = _unique_patch(shape, seed)
        lay = brick_layout(shape[1:], np.random.default_rng(seed), num_windows)
        out = local_pixel_shuffle(x, np.random.default_rng(seed), num_windows)  # same draws: same layout
        for axis in range(3):
            assert lay.lengths[axis].min() >= 1 and lay.lengths[axis].max() <= max_window_sides(shape[1:])[axis]
            assert lay.starts[axis][0] == 0 and lay.starts[axis][-1] + lay.lengths[axis][-1] == shape[axis + 1]
        touched = np.zeros(shape[1:], bool)
        for i, j, k in np.ndindex(lay.selected.shape):
            box = tuple(slice(s[n], s[n] + ln[n]) for s, ln, n in zip(lay.starts, lay.lengths, (i, j, k)))
            vals_out, vals_in = out[(slice(None),) + box], x[(slice(None),) + box]
            if lay.selected[i, j, k]:
                for c in range(shape[0]):
                    assert np.array_equal(np.sort(vals_out[c], axis=None), np.sort(vals_in[c], axis=None))
                touched[box] = True
            else:
                assert np.array_equal(vals_out, vals_in)
        assert np.array_equal(np.any(out != x, axis=0), np.any(out != x, axis=0) & touched)
        if num_windows == 40:
            assert 0 < touched.mean() < 0.2  # few windows: few bricks


def test_shuffle_is_deterministic_and_leaves_global_rng_alone():
    x = _unique_patch((2, 30, 30, 30), 5)
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    a = local_pixel_shuffle(x, np.random.default_rng(3))
    b = local_pixel_shuffle(x, np.random.default_rng(3))
    c = local_pixel_shuffle(x, np.random.default_rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert all(np.array_equal(u, v) for u, v in zip(np.random.get_state()[1:3], np_state[1:3]))
    assert torch.equal(torch.get_rng_state(), torch_state)
    # channels share bricks and permutations
    y = np.stack([x[0], x[0] * 2 + 1000])
    out = local_pixel_shuffle(y, np.random.default_rng(6))
    assert np.array_equal(out[1], out[0] * 2 + 1000)


def test_shuffle_small_patches_are_a_no_op():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 9, 9, 9)).astype(np.float32)  # 9 // 10 = 0 -> 1-voxel windows
    assert np.array_equal(local_pixel_shuffle(x, rng), x)
    assert np.array_equal(local_pixel_shuffle(x[:, :8], rng, num_windows=0), x[:, :8])


# -- intensity curve and painting ---------------------------------------------------------------------------
def test_intensity_curve_lookup_matches_np_interp_and_shape():
    rng = np.random.default_rng(5)
    u = rng.random((1, 16, 16, 16)).astype(np.float32)
    u.flat[:2] = [0.0, 1.0]
    inverted_seen = {True: 0, False: 0}
    for _ in range(12):
        xs, ys, inverted = random_intensity_curve(rng, 100_000)
        inverted_seen[inverted] += 1
        out = apply_intensity_curve(u, xs, ys)
        assert np.abs(out - np.interp(u, xs, ys)).max() < 1e-6
        assert out.min() >= 0 and out.max() <= 1
        ends = apply_intensity_curve(np.array([0.0, 1.0], dtype=np.float32), xs, ys)
        if inverted:  # the curve runs from (1, 1) at t=0: sorted x paired with unsorted y inverts
            assert ends[0] > 0.99 and ends[1] < 0.01
        else:
            assert ends[0] < 0.01 and ends[1] > 0.99
            grid = apply_intensity_curve(np.linspace(0, 1, 1001, dtype=np.float32), xs, ys)
            assert np.all(np.diff(grid) >= -1e-6)  # monotone increasing
    assert inverted_seen[True] and inverted_seen[False]


def test_in_painting_fills_boxes_inside_the_margin():
    rng = np.random.default_rng(6)
    x = np.full((1, 36, 36, 24), 2.0, dtype=np.float32)  # out of [0, 1] so that noise is detectable
    n_boxes = 0
    for _ in range(20):
        out = in_painting(x, rng)
        painted = np.argwhere(out[0] != 2.0)
        assert out.min() >= 0 and (out[out != 2.0] < 1).all()
        if len(painted):
            n_boxes += 1
            assert np.all(painted.min(0) >= 3) and np.all(painted.max(0) < np.array([33, 33, 21]))
    assert n_boxes >= 15  # at least one box with probability 0.95


def test_out_painting_keeps_boxes_and_fills_the_rest():
    rng = np.random.default_rng(7)
    x = np.full((1, 35, 35, 28), 2.0, dtype=np.float32)
    for _ in range(10):
        out = out_painting(x, rng)
        kept = out[0] == 2.0
        frac = kept.mean()
        # first kept box: sides dim - randint(3 dim // 7, 4 dim // 7) ~ 3/7..4/7 of each side
        assert (15 / 35) ** 2 * (12 / 28) * 0.99 <= frac < 0.9
        idx = np.argwhere(kept)
        assert np.all(idx.min(0) >= 3) and np.all(idx.max(0) < np.array([32, 32, 25]))
        assert np.all((out[0][~kept] >= 0) & (out[0][~kept] < 1))


def test_bad_config_is_a_clear_error():
    from nnpre.errors import NnPreError

    with pytest.raises(NnPreError, match="flip_rate"):
        get_pretext("model_genesis", flip_rate=2.0)
    with pytest.raises(NnPreError, match="unknown option"):
        get_pretext("model_genesis", shuffle_rate=0.5)


# -- the official window process (faithful default) -------------------------------------------------------
from nnpre_trainers.pretext.model_genesis import (  # noqa: E402
    ShuffleWindows,
    draw_shuffle_windows,
    local_pixel_shuffle_windows,
    shuffle_windows,
    shuffle_windows_loop,
)


@pytest.mark.parametrize("shape,num_windows", [((1, 40, 40, 20), 10_000), ((2, 30, 23, 41), 3000),
                                               ((1, 64, 64, 32), 10_000), ((1, 9, 12, 15), 500)])
def test_vectorised_window_shuffle_equals_the_loop_for_the_same_draws(shape, num_windows):
    x = _unique_patch(shape, 3)
    for seed in range(3):
        w = draw_shuffle_windows(shape[1:], np.random.default_rng(seed), num_windows)
        assert np.array_equal(shuffle_windows(x, w), shuffle_windows_loop(x, w))


def test_window_draws_have_the_official_distributions():
    w = draw_shuffle_windows((60, 40, 25), np.random.default_rng(0), 20_000)
    sides = max_window_sides((60, 40, 25))
    assert tuple(sides) == (6, 4, 2)  # dim // 10
    for a, (dim, m) in enumerate(zip((60, 40, 25), sides)):
        counts = np.bincount(w.sizes[:, a], minlength=m + 1)[1:]
        assert len(counts) == m and all(_within_binomial(c, 20_000, 1 / m) for c in counts)
        assert (w.starts[:, a] >= 0).all() and (w.starts[:, a] + w.sizes[:, a] <= dim).all()
        # position uniform over [0, dim - side]: its relative position has mean 1/2
        rel = w.starts[:, a] / np.maximum(dim - w.sizes[:, a], 1)
        assert abs(rel.mean() - 0.5) < 0.01
    assert np.array_equal(np.diff(w.offsets), w.sizes.prod(1)) and w.keys.size == w.offsets[-1]


def test_windows_read_from_the_original_and_later_windows_overwrite():
    x = _unique_patch((1, 6, 6, 6), 0)
    keys = np.random.default_rng(0).random(8 + 8)
    w = ShuffleWindows(sizes=np.array([[2, 2, 2], [2, 2, 2]]), starts=np.array([[0, 0, 0], [1, 1, 1]]), keys=keys,
                       offsets=np.array([0, 8, 16]))
    out = shuffle_windows(x, w)
    first = x[0, 0:2, 0:2, 0:2].ravel()[np.argsort(keys[:8])].reshape(2, 2, 2)
    second = x[0, 1:3, 1:3, 1:3].ravel()[np.argsort(keys[8:])].reshape(2, 2, 2)  # from the original, not `first`
    expect = x[0].copy()
    expect[0:2, 0:2, 0:2] = first
    expect[1:3, 1:3, 1:3] = second
    assert np.array_equal(out[0], expect)
    # repeated values: the official process is not a permutation of the patch (bricks are)
    big = _unique_patch((1, 64, 64, 64), 1)
    res = local_pixel_shuffle_windows(big, np.random.default_rng(2))
    dup = 1 - np.unique(res).size / res.size
    assert 0.05 < dup < 0.4, dup
    assert np.unique(local_pixel_shuffle(big, np.random.default_rng(2))).size == big.size


def test_faithful_defaults_use_windows_official_flips_and_per_patch_range():
    cfg = ModelGenesisConfig()
    assert (cfg.local_shuffle, cfg.flip_choices, cfg.intensity_window) == ("windows", ("channel", "x", "y"), None)
    x = _unique_patch((1, 20, 20, 20), 5)
    only_shuffle = ModelGenesisConfig(flip_rate=0.0, local_rate=1.0, nonlinear_rate=0.0, paint_rate=0.0)
    inp, tgt, _ = model_genesis_pair(x, np.random.default_rng(9), only_shuffle)
    rng = np.random.default_rng(9)
    rng.random(), rng.random()  # the (failed) flip draw and the local_rate draw
    assert np.array_equal(inp, local_pixel_shuffle_windows(x, rng))
    # flips: uniform over {channel (no-op), X, Y}; Z never flips
    rng = np.random.default_rng(0)
    draws = np.concatenate([random_flip_axes(rng, 1.0, 3) for _ in range(3000)])
    assert set(draws.tolist()) == {-1, 0, 1}
    assert all(_within_binomial(int((draws == a).sum()), draws.size, 1 / 3) for a in (-1, 0, 1))
    spatial = np.concatenate([random_flip_axes(rng, 1.0, 3, ("x", "y", "z")) for _ in range(300)])
    assert set(spatial.tolist()) == {0, 1, 2}


def test_fixed_intensity_window_maps_through_the_window():
    x = np.linspace(-3, 3, 8 ** 3, dtype=np.float32).reshape(1, 8, 8, 8)
    cfg = ModelGenesisConfig(flip_rate=0.0, local_rate=0.0, nonlinear_rate=1.0, paint_rate=0.0,
                             bezier_points=2000, intensity_window=(-1.0, 1.0))
    inp, tgt, applied = model_genesis_pair(x, np.random.default_rng(1), cfg)
    assert applied["nonlinear"] == 1 and np.array_equal(tgt, x)
    assert inp.min() >= -1.0 - 1e-6 and inp.max() <= 1.0 + 1e-6  # official: clipped window -> [0, 1] -> curve
    # voxels below/above the window all get the curve's end values
    assert np.ptp(inp[x < -1]) < 1e-6 and np.ptp(inp[x > 1]) < 1e-6
    with pytest.raises(ValueError):
        ModelGenesisConfig(intensity_window=(1.0, 1.0))
