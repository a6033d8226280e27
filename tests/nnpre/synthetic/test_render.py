"""Tests for rendering synthetic cases: determinism, grid geometry, lesion contrast (48-64 mm FOVs for speed)."""
import dataclasses

import numpy as np
from scipy import ndimage

from nnpre.synthetic import (
    STREAM_POOL,
    STREAM_TRAIN,
    SynthConfig,
    case_rng,
    get_synth_config,
    synthesize_case,
)

SMALL = SynthConfig(fov_mm=48.0)


def test_same_seed_same_case_and_streams_differ():
    a = synthesize_case(case_rng(7, STREAM_TRAIN, 1), SMALL)
    b = synthesize_case(case_rng(7, STREAM_TRAIN, 1), SMALL)
    for f in ("image", "semantic", "instances"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert (a.spacing, a.origin, a.direction, a.instance_classes) == (b.spacing, b.origin, b.direction,
                                                                      b.instance_classes)
    c = synthesize_case(case_rng(7, STREAM_POOL, 1), SMALL)
    d = synthesize_case(case_rng(8, STREAM_TRAIN, 1), SMALL)
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)
    assert d.image.shape != a.image.shape or not np.array_equal(d.image, a.image)


def test_spacing_ranges_shapes_and_variation():
    cfg = SMALL
    cases = [synthesize_case(case_rng(0, STREAM_TRAIN, k), cfg) for k in range(6)]
    for c in cases:
        sx, sy, sz = c.spacing
        assert sx == sy and 0.6 <= sx <= 0.9 and 1.25 <= sz <= 3.0
        assert c.image.shape[1:] == tuple(int(round(48.0 / s)) for s in (sz, sy, sx))
        assert c.image.dtype == np.float32 and c.semantic.dtype == np.uint8 and c.instances.dtype == np.int16
        assert c.semantic.shape == c.instances.shape == c.image.shape[1:]
    assert len({c.spacing for c in cases}) == len(cases)
    assert np.ptp([c.spacing[2] for c in cases]) > 0.3
    assert len({c.origin for c in cases}) == len(cases)


def test_easy_preset_is_high_contrast():
    cfg = get_synth_config("easy", fov_mm=64.0)
    stats = [s for k in range(3) for s in _ring_stats(synthesize_case(case_rng(0, STREAM_TRAIN, k), cfg))]
    assert stats and all(d > 3.0 * n for d, n, _, _ in stats)


def _ring_stats(case):
    """(lesion mean - surrounding shell mean, noise std, site) for every lesion of ``case``."""
    img, inst = case.image[0], case.instances
    out = []
    sx, sy, sz = case.spacing
    struct = np.ones((3, 3, 3), bool)
    for les in case.info["lesions"]:
        m = inst == les["instance"]
        shell = ndimage.binary_dilation(m, struct, iterations=3) & ~ndimage.binary_dilation(m, struct) & (inst == 0)
        out.append((float(img[m].mean() - np.median(img[shell])), case.info["noise_std_hu"], les["site"], les["kind"]))
    return out


def test_lesion_contrast_includes_low_contrast_and_task_is_not_threshold_separable():
    cfg = SynthConfig(fov_mm=64.0, n_lesions=(3, 5))
    cases = [synthesize_case(case_rng(11, STREAM_TRAIN, k), cfg) for k in range(8)]
    stats = [s for c in cases for s in _ring_stats(c)]
    diffs = np.array([abs(d) for d, _, _, _ in stats])
    noise = np.array([n for _, n, _, _ in stats])
    assert len(stats) >= 15
    assert np.sum(diffs < 1.0 * noise) >= 2  # lesions barely above the per-voxel noise
    assert np.sum(diffs > 5.0 * noise) >= 2  # and clearly visible ones (lung nodules, enhancing)
    assert {k for _, _, _, k in stats} >= {"hypodense", "solid"}
    # No global intensity window separates lesions from the rest: the best "lo < HU < hi" window
    # (chosen with knowledge of the labels) gives a low Dice, so a model must use shape and context.
    img = np.concatenate([c.image[0].ravel() for c in cases])
    les = np.concatenate([(c.instances > 0).ravel() for c in cases])
    edges = np.arange(-1030.0, 1000.0, 20.0)
    h_les = np.histogram(img[les], edges)[0]
    h_all = np.histogram(img, edges)[0]
    c_les = np.concatenate([[0], np.cumsum(h_les)])
    c_all = np.concatenate([[0], np.cumsum(h_all)])
    tp = c_les[None, :] - c_les[:, None]  # [i, j]: voxels in bins i..j-1
    pred = c_all[None, :] - c_all[:, None]
    best = float(np.max(np.where(pred > 0, 2 * tp / np.maximum(pred + les.sum(), 1), 0.0)))
    assert best < 0.3, best


def test_lesions_below_min_voxels_are_dropped_from_image_and_labels():
    cfg = dataclasses.replace(SMALL, n_lesions=(3, 3))
    kept = synthesize_case(case_rng(2, STREAM_TRAIN, 0), cfg)
    dropped = synthesize_case(case_rng(2, STREAM_TRAIN, 0), dataclasses.replace(cfg, lesion_min_voxels=10 ** 9))
    assert kept.info["lesions"] and kept.instances.max() == len(kept.info["lesions"])
    assert dropped.info["lesions"] == [] and not dropped.instances.any() and dropped.instance_classes == {}
    # same anatomy and noise draws: the images differ only where the kept case has its lesions
    lesion_zone = ndimage.binary_dilation(kept.instances > 0, iterations=3)
    diff = np.abs(kept.image[0] - dropped.image[0]) > 1e-3
    assert diff.any() and diff[~lesion_zone].mean() < 1e-3


def test_two_channels_share_geometry_and_second_is_a_different_contrast():
    one = synthesize_case(case_rng(4, STREAM_TRAIN, 1), SMALL, channels=1)
    two = synthesize_case(case_rng(4, STREAM_TRAIN, 1), SMALL, channels=2)
    assert two.image.shape == (2,) + one.image.shape[1:]
    np.testing.assert_array_equal(two.image[0], one.image[0])  # channel 1 draws its noise after channel 0
    np.testing.assert_array_equal(two.instances, one.instances)
    assert 0.8 < abs(np.corrcoef(two.image[0].ravel(), two.image[1].ravel())[0, 1]) < 0.999
