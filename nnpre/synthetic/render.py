"""Sampling a scene on a case's voxel grid: clean phantom, lesions, then scanner effects.

:func:`synthesize_case` runs the steps in a fixed order, drawing every random number from the one generator
it is given: grid geometry -> scene -> lesions -> (rendering draws nothing) -> scanner bias, calibration and
noise. Arrays are (Z, Y, X); spacing, origin and points are (x, y, z) mm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from nnpre.errors import fail
from nnpre.synthetic.config import SynthConfig
from nnpre.synthetic.geometry import CosineField, Grid, composite, soft
from nnpre.synthetic.scene import Lesion, Scene, Tube, sample_lesions, sample_scene

__all__ = ["SyntheticCase", "synthesize_case"]


@dataclass
class SyntheticCase:
    """One generated case.

    Attributes:
        image: (C, Z, Y, X) float32 intensities; channel 0 is HU, channel 1 (if any) the second contrast.
        semantic: (Z, Y, X) uint8; 0 background, 1 lesion, 2 lung (only with ``config.lung_label``).
        instances: (Z, Y, X) int16; 0 background, 1..N lesion instances (consecutive).
        instance_classes: {instance id: class index}; always 0 (= lesion).
        spacing: (x, y, z) mm, SimpleITK order.
        origin: (x, y, z) mm of voxel (0, 0, 0).
        direction: row-major 3x3 direction cosine matrix (9 floats), SimpleITK order.
        info: per-case generation details (noise std, lesion list with site/radius/HU/contrast, ...).
    """

    image: np.ndarray
    semantic: np.ndarray
    instances: np.ndarray
    instance_classes: Dict[int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Geometry of the case
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CaseGeometry:
    grid: Grid
    direction: np.ndarray  # (3, 3)
    origin: np.ndarray  # (3,) x, y, z mm of voxel (0, 0, 0)
    flipped: bool


def _case_geometry(rng: np.random.Generator, cfg: SynthConfig, fov: np.ndarray) -> _CaseGeometry:
    """Per-case spacing (in-plane, slice), direction (identity or diag(-1, -1, 1)) and a jittered origin."""
    s_in = rng.uniform(*cfg.inplane_spacing_mm)
    s_z = rng.uniform(*cfg.slice_spacing_mm)
    grid = Grid.make((s_in, s_in, s_z), fov)
    flip = rng.random() < cfg.flip_direction_prob
    direction = np.diag([-1.0, -1.0, 1.0]) if flip else np.eye(3)
    world_center = rng.uniform(-cfg.origin_jitter_mm, cfg.origin_jitter_mm, size=3)
    first_voxel_local = np.array([grid.x[0], grid.y[0], grid.z[0]], dtype=float)
    return _CaseGeometry(grid, direction, world_center + direction @ first_voxel_local, bool(flip))


# ----------------------------------------------------------------------------------------------------
# Clean phantom (no randomness)
# ----------------------------------------------------------------------------------------------------


def _render_tube(grid: Grid, tube: Tube, occ: np.ndarray, edge: float, chunk: int = 12) -> None:
    """Max-combine the soft occupancy of ``tube`` into ``occ`` (Z, Y, X), working on bounding sub-boxes."""
    pts, radii = tube.points.astype(np.float32), tube.radii.astype(np.float32)
    for s in range(0, len(pts) - 1, chunk):
        a, b = pts[s:s + chunk], pts[s + 1:s + chunk + 1]
        ra, rb = radii[s:s + chunk], radii[s + 1:s + chunk + 1]
        m = min(len(a), len(b))
        a, b, ra, rb = a[:m], b[:m], ra[:m], rb[:m]
        pad = float(max(ra.max(), rb.max())) + edge
        lo = np.minimum(a.min(0), b.min(0)) - pad
        hi = np.maximum(a.max(0), b.max(0)) + pad
        got = grid.box(lo, hi)
        if got is None:
            continue
        sl, (x, y, z) = got
        best = None
        for k in range(m):
            ab = b[k] - a[k]
            l2 = float(ab @ ab) + 1e-9
            px, py, pz = x - a[k, 0], y - a[k, 1], z - a[k, 2]
            t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / l2, 0.0, 1.0)
            d = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
            sd = ra[k] + t * (rb[k] - ra[k]) - d
            best = sd if best is None else np.maximum(best, sd)
        np.maximum(occ[sl], soft(best, edge), out=occ[sl])


def _render_body(grid: Grid, scene: Scene, cfg: SynthConfig) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Air, then soft tissue with texture, the subcutaneous fat layer and fat islands.

    Returns (image HU, body occupancy in [0, 1], body rho (< 1 inside)), each (Z, Y, X) float32.
    """
    edge = cfg.edge_width_mm
    x, y, z = grid.full()
    img = np.full(grid.shape, -1000.0, dtype=np.float32)
    body_rho = scene.body.rho(x, y, z).astype(np.float32)
    depth = (1.0 - body_rho) * float(scene.body.semi[:2].min())  # ~ mm below the skin
    body_occ = soft(depth, edge)
    tissue = scene.soft_hu_at(x, y, z)
    fat = np.maximum(soft(scene.fat_layer_mm - depth, edge),
                     soft((scene.fat_field(x, y, z) - scene.fat_threshold) * 6.0, edge))
    composite(tissue, fat, np.float32(cfg.fat_hu))
    composite(img, body_occ, tissue)
    return img, body_occ, body_rho


def _render_lungs(img: np.ndarray, grid: Grid, scene: Scene, cfg: SynthConfig, body_occ: np.ndarray,
                  body_rho: np.ndarray) -> np.ndarray:
    """Composite both textured lungs into ``img`` in place; returns the hard lung mask (Z, Y, X) bool."""
    lung_hard = np.zeros(grid.shape, dtype=bool)
    for lung in scene.lungs:
        got = grid.box(*lung.bounds())
        if got is None:
            continue
        sl, (bx, by, bz) = got
        rho = lung.rho(bx, by, bz)
        occ = soft((1.0 - rho) * float(lung.semi[:2].min()), cfg.edge_width_mm) * body_occ[sl]
        lung_val = scene.lung_hu + cfg.lung_texture_hu * scene.lung_texture(bx, by, bz)
        composite(img[sl], occ, lung_val)
        lung_hard[sl] |= (rho < 1.0) & (body_rho[sl] < 1.0)
    return lung_hard


def _render_spine_and_vessels(img: np.ndarray, grid: Grid, scene: Scene, cfg: SynthConfig,
                              body_occ: np.ndarray) -> None:
    """Composite the spine cylinder, then all vessels (outside bone, inside the body) into ``img`` in place."""
    edge = cfg.edge_width_mm
    x, y, _ = grid.full()
    r_sp = np.sqrt((x - scene.spine_center[0]) ** 2 + (y - scene.spine_center[1]) ** 2)
    bone_occ = soft(scene.spine_radius - r_sp, edge) * body_occ
    composite(img, bone_occ, np.float32(scene.bone_hu))
    vessel_occ = np.zeros(grid.shape, dtype=np.float32)
    for tube in scene.vessels:
        _render_tube(grid, tube, vessel_occ, edge)
    vessel_occ *= body_occ * (1.0 - bone_occ)
    composite(img, vessel_occ, np.float32(scene.vessel_hu))


def _render_lesions(img: np.ndarray, grid: Grid, lesions: List[Lesion],
                    cfg: SynthConfig) -> Tuple[np.ndarray, List[Lesion]]:
    """Composite lesions into ``img`` in place and label them.

    Lesions with fewer than ``cfg.lesion_min_voxels`` voxels (or off the grid) are skipped in image and labels.
    Returns the (Z, Y, X) int16 instance map (1..N in order) and the N lesions kept.
    """
    edge = cfg.edge_width_mm
    instances = np.zeros(grid.shape, dtype=np.int16)
    kept: List[Lesion] = []
    for les in lesions:
        ext = les.extent + edge
        got = grid.box(les.center - ext, les.center + ext)
        if got is None:
            continue
        sl, (bx, by, bz) = got
        inside = les.inside(bx, by, bz)
        hard = inside > 0
        if int(hard.sum()) < cfg.lesion_min_voxels:
            continue
        composite(img[sl], soft(inside, edge), np.float32(les.hu))
        kept.append(les)
        instances[sl][hard] = len(kept)
    return instances, kept


# ----------------------------------------------------------------------------------------------------
# Scanner
# ----------------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int, int], corr_vox: float) -> np.ndarray:
    """Unit-variance Gaussian noise, correlated in-plane (Y, X) with a Gaussian of ``corr_vox`` voxels."""
    noise = rng.standard_normal(size=shape, dtype=np.float32)
    if corr_vox > 0:
        noise = ndimage.gaussian_filter(noise, sigma=(0.0, corr_vox, corr_vox), mode="reflect", truncate=3.0)
        noise /= max(float(noise.std()), 1e-6)
    return noise


def _second_contrast(hu: np.ndarray) -> np.ndarray:
    """A second "contrast" of the same anatomy: a monotone, strongly non-linear remap of HU.

    ``500 tanh((HU + 300) / 350) + 0.25 HU`` compresses lung and enhancing structures and stretches the
    soft-tissue range, so its intensity statistics differ from CT (nnU-Net normalises it by z-score
    because its channel name is not "CT").
    """
    return (500.0 * np.tanh((hu + 300.0) / 350.0) + 0.25 * hu).astype(np.float32)


def _apply_scanner(rng: np.random.Generator, img: np.ndarray, grid: Grid, cfg: SynthConfig,
                   channels: int) -> Tuple[np.ndarray, dict]:
    """Partial-volume blur, smooth multiplicative/additive bias, global HU calibration and correlated noise.

    Args:
        img: (Z, Y, X) float32 clean phantom in HU (consumed).
    Returns:
        The (C, Z, Y, X) float32 image (channel 0 clipped to [-1024, 3071] HU) and the drawn parameters.
    """
    if cfg.psf_sigma_mm > 0:
        sigma_vox = [cfg.psf_sigma_mm / s for s in (grid.spacing[2], grid.spacing[1], grid.spacing[0])]
        img = ndimage.gaussian_filter(img, sigma=sigma_vox, mode="nearest", truncate=3.0)
    bias_m = rng.uniform(*cfg.bias_mult)
    bias_a = rng.uniform(*cfg.bias_add_hu)
    f_mult = CosineField.sample(rng, 4, (80.0, 250.0))
    f_add = CosineField.sample(rng, 4, (60.0, 200.0))
    scale = rng.uniform(*cfg.hu_scale)
    offset = rng.uniform(*cfg.hu_offset)
    x, y, z = grid.full()
    clean = (img + 1000.0) * (1.0 + bias_m * np.clip(f_mult(x, y, z), -2.5, 2.5)) * scale - 1000.0
    clean += offset + bias_a * np.clip(f_add(x, y, z), -2.5, 2.5)
    del img
    noise_std = rng.uniform(*cfg.noise_std_hu)
    ch0 = clean + noise_std * _smooth_noise(rng, grid.shape, cfg.noise_correlation_vox)
    chans = [np.clip(ch0, -1024.0, 3071.0)]
    if channels == 2:
        ch1 = _second_contrast(clean) + 0.7 * noise_std * _smooth_noise(rng, grid.shape, cfg.noise_correlation_vox)
        chans.append(ch1)
    params = {"noise_std_hu": float(noise_std), "hu_scale": float(scale), "hu_offset": float(offset),
              "bias_mult": float(bias_m), "bias_add_hu": float(bias_a)}
    return np.stack(chans).astype(np.float32, copy=False), params


# ----------------------------------------------------------------------------------------------------
# The whole case
# ----------------------------------------------------------------------------------------------------


def _case_info(geo: _CaseGeometry, scene: Scene, kept: List[Lesion], scanner: dict) -> dict:
    return {
        "spacing": [float(s) for s in geo.grid.spacing],
        "shape_zyx": list(geo.grid.shape),
        **scanner,
        "soft_tissue_hu": float(scene.soft_hu),
        "vessel_hu": float(scene.vessel_hu),
        "n_vessels": len(scene.vessels),
        "flipped": geo.flipped,
        "lesions": [
            {"instance": i + 1, "site": les.site, "kind": les.kind, "radius_mm": round(les.radius, 3),
             "hu": round(les.hu, 2), "contrast_hu": round(les.contrast, 2),
             "center_mm": [round(float(v), 3) for v in les.center]}
            for i, les in enumerate(kept)
        ],
    }


def synthesize_case(rng: np.random.Generator, config: Optional[SynthConfig] = None, channels: int = 1) -> SyntheticCase:
    """Generate one CT-like case from ``rng`` (all randomness comes from it).

    Args:
        rng: the case's generator; the same generator state always gives the same case.
        config: generator knobs; ``None`` means ``SynthConfig()``.
        channels: 1 (CT) or 2 (CT plus a non-linearly remapped second contrast with independent noise).

    Returns:
        A :class:`SyntheticCase` with image (C, Z, Y, X) float32, semantic/instance maps (Z, Y, X),
        spacing/origin (x, y, z) mm and a 9-element direction.
    """
    cfg = config or SynthConfig()
    if channels not in (1, 2):
        fail(f"channels must be 1 or 2, got {channels}")
    fov = np.asarray(cfg.fov_xyz, dtype=float)
    geo = _case_geometry(rng, cfg, fov)
    scene = sample_scene(rng, cfg, fov)
    lesions = sample_lesions(rng, cfg, scene)

    img, body_occ, body_rho = _render_body(geo.grid, scene, cfg)
    lung_hard = _render_lungs(img, geo.grid, scene, cfg, body_occ, body_rho)
    _render_spine_and_vessels(img, geo.grid, scene, cfg, body_occ)
    del body_occ, body_rho
    instances, kept = _render_lesions(img, geo.grid, lesions, cfg)
    image, scanner = _apply_scanner(rng, img, geo.grid, cfg, channels)
    del img

    semantic = (instances > 0).astype(np.uint8)
    if cfg.lung_label:
        semantic[lung_hard & (instances == 0)] = 2
    return SyntheticCase(
        image=image, semantic=semantic, instances=instances,
        instance_classes={i + 1: 0 for i in range(len(kept))},
        spacing=tuple(float(s) for s in geo.grid.spacing),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in geo.origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in geo.direction.ravel()),
        info=_case_info(geo, scene, kept, scanner),
    )
