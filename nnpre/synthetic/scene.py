"""The physical scene of one case, in mm and HU: body, lungs, spine, vessels and lesions.

Nothing here knows the voxel grid: :func:`sample_scene` and :func:`sample_lesions` draw a description from
the case's generator (always in the same order, so a case depends only on its generator state), and
:mod:`nnpre.synthetic.render` samples it on the grid. Points are (x, y, z) mm, centred on the FOV centre.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.special import erfinv

from nnpre.synthetic.config import SynthConfig
from nnpre.synthetic.geometry import CosineField, fibonacci_sphere, random_rotation, unit

__all__ = ["Ellipsoid", "Tube", "Lesion", "Scene", "sample_scene", "sample_lesions"]


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid with optional smooth coordinate warp; ``rho`` < 1 inside."""

    center: np.ndarray  # (3,) x, y, z
    semi: np.ndarray  # (3,)
    warp: Optional[Tuple[CosineField, CosineField, CosineField]] = None
    warp_mm: float = 0.0

    def rho(self, x, y, z) -> np.ndarray:
        """Normalised radius (< 1 inside) at broadcastable coordinates (mm)."""
        dx, dy, dz = x - self.center[0], y - self.center[1], z - self.center[2]
        if self.warp is not None:
            dx = dx + self.warp_mm * self.warp[0](x, y, z)
            dy = dy + self.warp_mm * self.warp[1](x, y, z)
            dz = dz + self.warp_mm * self.warp[2](x, y, z)
        return np.sqrt((dx / self.semi[0]) ** 2 + (dy / self.semi[1]) ** 2 + (dz / self.semi[2]) ** 2)

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """(lo, hi) corners (x, y, z mm) of a box containing the warped ellipsoid."""
        r = self.semi + 2 * self.warp_mm + 1.0
        return self.center - r, self.center + r


@dataclass(frozen=True)
class Tube:
    """Polyline centreline (P, 3) mm with per-point radii (P,) mm."""

    points: np.ndarray
    radii: np.ndarray


@dataclass(frozen=True)
class Lesion:
    """A rotated, lobulated ellipsoid with one intensity."""

    center: np.ndarray  # (3,) mm
    radius: float  # mean radius mm
    semi: np.ndarray  # (3,) semi-axes mm
    rotation: np.ndarray  # (3, 3), columns = axes
    lobe_dirs: np.ndarray  # (3, 3) unit vectors (rows)
    lobe_phases: np.ndarray  # (3,)
    lobulation: float
    hu: float
    site: str  # "lung", "soft" or "vessel"
    kind: str  # "solid", "ground_glass", "enhancing", "hypodense" or "hyperdense"
    contrast: float  # lesion HU - local background HU (clean phantom)

    @property
    def extent(self) -> float:
        """Radius (mm) of a sphere around ``center`` that contains the lesion."""
        return float(self.semi.max() * (1 + self.lobulation) + 0.5)

    def inside(self, x, y, z) -> np.ndarray:
        """Signed normalised inside measure: (g(n) - rho) * radius (mm, positive inside)."""
        d = [x - self.center[0], y - self.center[1], z - self.center[2]]
        # coordinates in the lesion frame, normalised by the semi-axes
        q = [sum(d[i] * self.rotation[i, j] for i in range(3)) / self.semi[j] for j in range(3)]
        rho = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
        inv = 1.0 / np.maximum(rho, 1e-6)
        g = 1.0
        for k in range(3):
            proj = (q[0] * self.lobe_dirs[k, 0] + q[1] * self.lobe_dirs[k, 1] + q[2] * self.lobe_dirs[k, 2]) * inv
            g = g + (self.lobulation / 3.0) * np.cos(3.0 * proj + self.lobe_phases[k])
        return (g - rho) * self.radius


@dataclass(frozen=True)
class Scene:
    """Everything of a case except lesions and scanner effects."""

    fov: np.ndarray
    body: Ellipsoid
    fat_layer_mm: float
    soft_hu: float
    texture: CosineField
    fat_field: CosineField
    fat_threshold: float
    lungs: Tuple[Ellipsoid, Ellipsoid]
    lung_hu: float
    lung_texture: CosineField
    spine_center: np.ndarray  # (2,) x, y
    spine_radius: float
    bone_hu: float
    vessels: Tuple[Tube, ...]
    vessel_hu: float
    texture_amp: float = 12.0  # HU amplitude of the soft-tissue texture

    # --- analytic region tests at arbitrary points (used for lesion placement) ---
    def in_body_core(self, x, y, z) -> np.ndarray:
        """Inside the body and more than 1 mm below the subcutaneous fat layer."""
        rho = self.body.rho(x, y, z)
        return (1.0 - rho) * float(self.body.semi[:2].min()) > self.fat_layer_mm + 1.0

    def in_lung(self, x, y, z) -> np.ndarray:
        return np.minimum(self.lungs[0].rho(x, y, z), self.lungs[1].rho(x, y, z)) < 1.0

    def in_bone(self, x, y, z) -> np.ndarray:
        """Within 1 mm of the spine cylinder."""
        r = np.sqrt((x - self.spine_center[0]) ** 2 + (y - self.spine_center[1]) ** 2)
        return r < self.spine_radius + 1.0

    def soft_hu_at(self, x, y, z) -> np.ndarray:
        """Clean soft-tissue HU (baseline plus texture) at the given points."""
        return self.soft_hu + self.texture_amp * self.texture(x, y, z)


# ----------------------------------------------------------------------------------------------------
# Anatomy
# ----------------------------------------------------------------------------------------------------


def random_tube(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float,
                radius: float, tortuosity: float, keep: Callable[[np.ndarray], bool], step: float = 1.5,
                taper: float = 0.6) -> Optional[Tube]:
    """Persistent random walk from ``start`` (mm) that stops when ``keep(point)`` turns false.

    Radii fall linearly from ``radius`` to ``taper * radius``; ``None`` if fewer than 3 points survive.
    """
    n = max(2, int(length / step))
    noise = rng.normal(size=(n, 3)) * tortuosity * np.sqrt(step)
    noise = ndimage.gaussian_filter1d(noise, sigma=2.0, axis=0, mode="nearest") * 2.0
    pts = [np.asarray(start, dtype=float)]
    d = unit(np.asarray(direction, dtype=float))
    for k in range(n):
        d = unit(d + noise[k])
        p = pts[-1] + step * d
        if not keep(p):
            break
        pts.append(p)
    if len(pts) < 3:
        return None
    pts_a = np.asarray(pts)
    radii = radius * (1.0 - (1.0 - taper) * np.linspace(0.0, 1.0, len(pts_a)))
    return Tube(pts_a, radii)


def _sample_lungs(rng: np.random.Generator, fov: np.ndarray, body: Ellipsoid,
                  fat_layer: float) -> Tuple[Ellipsoid, Ellipsoid]:
    """Left/right warped ellipsoids, shrunk until their surface sits inside the body core."""
    half, center_b, semi_b = fov / 2.0, body.center, body.semi
    lungs = []
    for side in (-1.0, 1.0):
        scale = 1.0
        cx = center_b[0] + side * rng.uniform(0.42, 0.52) * semi_b[0]
        cy = center_b[1] - rng.uniform(0.0, 0.15) * semi_b[1]
        cz = rng.uniform(-0.2, 0.2) * fov[2]
        semi = np.array([rng.uniform(0.28, 0.36) * semi_b[0], rng.uniform(0.55, 0.7) * semi_b[1],
                         rng.uniform(0.8, 1.6) * half[2]])
        warp = tuple(CosineField.sample(rng, 3, (25.0, 60.0)) for _ in range(3))
        warp_mm = 0.08 * float(semi[:2].min())
        for _ in range(20):
            lung = Ellipsoid(np.array([cx, cy, cz]), semi * scale, warp, warp_mm * scale)
            # surface samples of the lung must lie inside the body core
            u = fibonacci_sphere(64)
            pts = lung.center + u * (lung.semi + lung.warp_mm)
            if np.all(body.rho(pts[:, 0], pts[:, 1], pts[:, 2]) < 1.0 - (fat_layer + 3.0) / semi_b[:2].min()):
                break
            scale *= 0.93
        lungs.append(lung)
    return lungs[0], lungs[1]


def _sample_vessels(rng: np.random.Generator, cfg: SynthConfig, fov: np.ndarray, body: Ellipsoid,
                    lungs: Tuple[Ellipsoid, Ellipsoid], spine_c: np.ndarray, spine_r: float) -> Tuple[Tube, ...]:
    """An aorta-like tube along z beside the spine, then ``cfg.n_vessels`` branching trunks inside the body."""
    half, center_b, semi_b = fov / 2.0, body.center, body.semi

    def in_body(p: np.ndarray) -> bool:
        r = np.sqrt((p[0] - spine_c[0]) ** 2 + (p[1] - spine_c[1]) ** 2)
        return bool(body.rho(p[0], p[1], p[2]) < 0.93 and r > spine_r + 1.5 and np.all(np.abs(p) < half + 5.0))

    tubes: List[Tube] = []
    # aorta: anterior-left of the spine, roughly along z
    ar = rng.uniform(*cfg.aorta_radius_mm)
    a_start = np.array([spine_c[0] - rng.uniform(0.5, 1.0) * spine_r - ar, spine_c[1] - spine_r - ar - 1.5,
                        -half[2] - 5.0])
    aorta = random_tube(rng, a_start, np.array([0.0, 0.0, 1.0]), fov[2] + 10.0, ar, 0.03,
                        lambda p: bool(np.abs(p[2]) < half[2] + 6.0), step=2.0, taper=1.0)
    if aorta is not None and ar > 0:
        tubes.append(aorta)
    n_vessels = int(rng.integers(cfg.n_vessels[0], cfg.n_vessels[1] + 1))
    for _ in range(n_vessels):
        if rng.random() < cfg.vessel_in_lung_fraction:
            lung = lungs[int(rng.integers(2))]
            start = lung.center + rng.uniform(-0.6, 0.6, size=3) * lung.semi
        else:
            start = center_b + rng.uniform(-0.6, 0.6, size=3) * np.array([semi_b[0], semi_b[1], half[2]])
        if not in_body(start):
            continue
        length = rng.uniform(*cfg.vessel_length_mm)
        radius = rng.uniform(*cfg.vessel_radius_mm)
        direction = unit(rng.normal(size=3))
        trunk_parts = []
        for sgn in (1.0, -1.0):  # grow both ways from the start so vessels traverse the FOV
            t = random_tube(rng, start, sgn * direction, length / 2, radius, cfg.vessel_tortuosity, in_body)
            if t is not None:
                trunk_parts.append(t)
        for t in trunk_parts:
            tubes.append(t)
            for _b in range(int(rng.integers(cfg.vessel_branches[0], cfg.vessel_branches[1] + 1))):
                i = int(rng.integers(1, len(t.points) - 1))
                d0 = unit(t.points[i + 1] - t.points[i - 1])
                d = unit(d0 + rng.normal(size=3) * 0.9)
                br = random_tube(rng, t.points[i], d, length * rng.uniform(0.2, 0.5), t.radii[i] * 0.65,
                                 cfg.vessel_tortuosity, in_body)
                if br is not None:
                    tubes.append(br)
    return tuple(tubes)


def sample_scene(rng: np.random.Generator, cfg: SynthConfig, fov: np.ndarray) -> Scene:
    """Draw body, fat, lungs, spine and vessels for a FOV of ``fov`` (x, y, z) mm."""
    half = fov / 2.0
    # body
    (ax_lo, ax_hi), (ay_lo, ay_hi) = cfg.body_semi_axes_frac
    semi_b = np.array([rng.uniform(ax_lo, ax_hi) * half[0], rng.uniform(ay_lo, ay_hi) * half[1],
                       rng.uniform(*cfg.body_length_frac) * half[2]])
    center_b = np.array([rng.uniform(-0.03, 0.03) * fov[0], rng.uniform(-0.03, 0.03) * fov[1], 0.0])
    body = Ellipsoid(center_b, semi_b)
    fat_layer = rng.uniform(*cfg.fat_layer_mm)
    soft_hu = rng.uniform(*cfg.soft_tissue_hu)
    texture = CosineField.sample(rng, 6, (15.0, 60.0))
    fat_field = CosineField.sample(rng, 6, (12.0, 40.0))
    # fat islands where the (unit-std) field exceeds the upper tail quantile
    fat_threshold = 1e9
    if cfg.fat_island_fraction > 0:
        fat_threshold = float(np.sqrt(2.0) * erfinv(1.0 - 2.0 * cfg.fat_island_fraction))

    lungs = _sample_lungs(rng, fov, body, fat_layer)
    lung_hu = rng.uniform(*cfg.lung_hu)
    lung_texture = CosineField.sample(rng, 4, (6.0, 20.0))

    # spine: cylinder along z, posterior midline
    spine_r = rng.uniform(0.13, 0.17) * semi_b[0]
    spine_c = np.array([center_b[0] + rng.uniform(-1.0, 1.0),
                        center_b[1] + semi_b[1] - fat_layer - spine_r - 0.15 * semi_b[1]])
    bone_hu = rng.uniform(*cfg.bone_hu)

    vessel_hu = rng.uniform(*cfg.vessel_hu)
    vessels = _sample_vessels(rng, cfg, fov, body, lungs, spine_c, spine_r)
    return Scene(fov=fov, body=body, fat_layer_mm=fat_layer, soft_hu=soft_hu, texture=texture,
                 fat_field=fat_field, fat_threshold=fat_threshold, lungs=lungs, lung_hu=lung_hu,
                 lung_texture=lung_texture, spine_center=spine_c, spine_radius=spine_r, bone_hu=bone_hu,
                 vessels=vessels, vessel_hu=vessel_hu, texture_amp=cfg.soft_tissue_texture_hu)


# ----------------------------------------------------------------------------------------------------
# Lesions
# ----------------------------------------------------------------------------------------------------


def _distance_to_tubes(p: np.ndarray, tubes: Sequence[Tube]) -> Tuple[float, int, int]:
    """Smallest (distance - radius) from point p to any tube and the (tube, point) index reaching it."""
    best = (np.inf, -1, -1)
    for ti, t in enumerate(tubes):
        d = np.linalg.norm(t.points - p, axis=1) - t.radii
        j = int(np.argmin(d))
        if d[j] < best[0]:
            best = (float(d[j]), ti, j)
    return best


def _lesion_center(rng: np.random.Generator, scene: Scene, site: str, radius: float) -> Optional[np.ndarray]:
    """A candidate centre for a lesion at ``site``; ``None`` for a vessel-site lesion in a scene without vessels."""
    if site == "lung":
        lung = scene.lungs[int(rng.integers(2))]
        return lung.center + rng.uniform(-0.8, 0.8, size=3) * lung.semi
    if site == "soft":
        half = scene.fov / 2.0
        return scene.body.center + rng.uniform(-0.85, 0.85, size=3) * np.array(
            [scene.body.semi[0], scene.body.semi[1], half[2]])
    if not scene.vessels:
        return None
    t = scene.vessels[int(rng.integers(len(scene.vessels)))]
    j = int(rng.integers(len(t.points)))
    tang = t.points[min(j + 1, len(t.points) - 1)] - t.points[max(j - 1, 0)]
    perp = unit(np.cross(unit(tang), unit(rng.normal(size=3))))
    return t.points[j] + perp * (t.radii[j] + radius * rng.uniform(0.6, 0.95))


def _site_fits(scene: Scene, site: str, c: np.ndarray, radius: float, sphere: np.ndarray) -> bool:
    """Whether a lesion of ``radius`` at ``c`` respects its site (lung, soft tissue away from vessels, vessel)."""
    pts = c + sphere * (radius * 0.9)
    px, py, pz = pts[:, 0], pts[:, 1], pts[:, 2]
    if site == "lung":
        return bool(scene.in_lung(*c)) and not (scene.in_lung(px, py, pz).mean() < 0.7
                                                or scene.in_bone(px, py, pz).any())
    if not scene.in_body_core(px, py, pz).all() or scene.in_bone(px, py, pz).any():
        return False
    if site == "soft":
        if scene.in_lung(px, py, pz).any():
            return False
        # keep "soft" lesions apart from vessels; the vessel site covers contact
        return not _distance_to_tubes(c, scene.vessels)[0] < radius + 1.0
    return True


def _lesion_intensity(rng: np.random.Generator, cfg: SynthConfig, scene: Scene,
                      c: np.ndarray) -> Tuple[str, float, float]:
    """(kind, HU, local background HU) of a lesion centred at ``c``."""
    in_lung_c = bool(scene.in_lung(*c))
    background = scene.lung_hu if in_lung_c else float(scene.soft_hu_at(*c))
    if in_lung_c:
        if rng.random() < cfg.ground_glass_prob:
            kind, hu = "ground_glass", rng.uniform(*cfg.ground_glass_hu)
        else:
            kind, hu = "solid", rng.uniform(*cfg.lung_lesion_hu)
    elif rng.random() < cfg.enhancing_prob:
        kind, hu = "enhancing", rng.uniform(*cfg.vessel_hu)
    else:
        sign = -1.0 if rng.random() < cfg.hypodense_prob else 1.0
        kind = "hypodense" if sign < 0 else "hyperdense"
        hu = background + sign * rng.uniform(*cfg.lesion_contrast_hu)
    return kind, float(hu), background


def sample_lesions(rng: np.random.Generator, cfg: SynthConfig, scene: Scene) -> List[Lesion]:
    """Draw ``cfg.n_lesions`` lesions by rejection sampling (60 attempts each; a lesion may be dropped).

    Each lesion lies wholly inside the FOV, ``cfg.lesion_min_gap_mm`` away from earlier ones, and at its
    site: mostly inside a lung, in soft tissue away from lungs, bone and vessels, or touching a vessel.
    """
    n = int(rng.integers(cfg.n_lesions[0], cfg.n_lesions[1] + 1))
    probs = np.asarray(cfg.lesion_site_probs, dtype=float)
    probs = probs / probs.sum()
    half = scene.fov / 2.0
    lesions: List[Lesion] = []
    sphere = fibonacci_sphere(26)
    for _ in range(n):
        site = ("lung", "soft", "vessel")[int(rng.choice(3, p=probs))]
        for _attempt in range(60):
            radius = float(np.exp(rng.uniform(np.log(cfg.lesion_radius_mm[0]), np.log(cfg.lesion_radius_mm[1]))))
            elong = rng.uniform(*cfg.lesion_elongation)
            semi = radius * np.array([elong ** (2 / 3), elong ** (-1 / 3), elong ** (-1 / 3)])
            rot = random_rotation(rng)
            lobe_dirs = np.array([unit(v) for v in rng.normal(size=(3, 3))])
            lobe_phases = rng.uniform(0, 2 * np.pi, size=3)
            ext = float(semi.max() * (1 + cfg.lesion_lobulation) + 0.5)
            c = _lesion_center(rng, scene, site, radius)
            if c is None:
                continue
            if np.any(np.abs(c) + ext > half - 1.0):  # whole lesion inside the FOV
                continue
            if any(np.linalg.norm(c - o.center) < ext + o.extent + cfg.lesion_min_gap_mm for o in lesions):
                continue  # separated from earlier lesions
            if not _site_fits(scene, site, c, radius, sphere):
                continue
            kind, hu, background = _lesion_intensity(rng, cfg, scene, c)
            lesions.append(Lesion(center=c, radius=radius, semi=semi, rotation=rot, lobe_dirs=lobe_dirs,
                                  lobe_phases=lobe_phases, lobulation=cfg.lesion_lobulation, hu=hu,
                                  site=site, kind=kind, contrast=float(hu - background)))
            break
    return lesions
