"""Deterministic synthetic CT-like lesion data: the built-in dataset of the demo and of all tests.

No real data can be downloaded, so nnpre ships its own generator. Each case is a small "chest-like"
phantom described in physical millimetres and then sampled on the case's own voxel grid:

* an ellipsoidal **body** of soft tissue (~40 HU, with a smooth +-12 HU organ texture, a subcutaneous
  fat layer and fat islands at ~-100 HU), air (-1000 HU) outside;
* two warped-ellipsoid **lungs** (~-850 HU) and a **spine** cylinder (bone, ~300..600 HU);
* contrast-filled **vessels** (+150..+250 HU): an aorta-like tube plus random smooth tortuous tubes with
  branches, many running through the lungs;
* 0..6 **lesions** (rotated, lobulated ellipsoids, radius 3..10 mm) in the lungs, in soft tissue and
  touching vessels;
* scanner effects: partial-volume blur, a smooth multiplicative + additive bias field, a global HU
  scale/offset, and spatially correlated Gaussian noise.

Spacing varies per case (in-plane 0.6..0.9 mm, slices 1.25..3 mm) over a fixed physical field of view
(96 mm cube by default), so shapes differ between cases and resampling is always exercised. A default
case has ~0.5-1.3 M voxels and takes ~0.1 s to generate; a whole default study (10 + 6 labelled cases in
both formats plus a 16-case pool) takes ~5 s on one core.

Calibration (why the defaults are what they are)
------------------------------------------------
A stock nnU-Net reaches Dice ~0.95 within 250 iterations on bright spheres in noise, which leaves no room
for pretraining to help. The defaults make the task hard in the ways that real lesion segmentation is:

* **Low contrast.** Soft-tissue lesions differ from their local surroundings by only 12..70 HU (60 %
  hypodense), while the per-case noise std is 10..30 HU and spatially correlated, so the contrast-to-noise
  ratio of many lesions is about 1 per voxel; only context over the whole lesion separates them.
* **Small.** Radii are log-uniform in 3..10 mm (median ~5.5 mm), i.e. 1.5..5 voxels at the 2 mm planning
  spacing of the CPU preset, and slices are up to 3 mm thick (strong partial volume).
* **Confounders.** 20 % of the non-lung lesions are "enhancing" with vessel-like HU (150..250) and 20 % of
  all lesions are placed touching a vessel, so intensity alone cannot tell lesion from vessel; only shape
  can. Lung nodules (-100..150 HU) compete with partial-volumed vessel cross-sections in the lungs;
  hypodense lesions compete with fat islands.
* **Case-to-case intensity variation.** Global HU scale 0.96..1.04 and offset +-25 HU, a multiplicative
  bias of up to 4 % of (HU + 1000) (i.e. up to ~+-40 HU in soft tissue) and an additive bias of up to
  20 HU, both smooth over the field of view; soft-tissue baseline 30..55 HU. A fixed global threshold
  therefore fails (the best label-aware HU window reaches Dice < 0.1); a model must learn robust local
  features, which is what pretraining on the unlabelled pool can supply.
* **Empty cases.** The lesion count is uniform in 0..6, so about 1 case in 7 has no lesion.

Measured with a proxy of the CPU preset (PlainConvUNet 8..64 features, 4 stages, 2 mm, 32^3 patches,
batch 2, CE + Dice, 600 AdamW iterations from scratch, sliding-window test Dice on 6 test cases, 1 CPU
thread, ~90 s per run):

=================  ==========================  ==========================
difficulty         10 labelled cases           2 labelled cases
=================  ==========================  ==========================
``easy``           0.91                        --
``medium``         0.28                        0.09
``default``        0.16 / 0.33 (seeds 0 / 1)   0.13 / 0.08 (seeds 0 / 1)
=================  ==========================  ==========================

so the default task is far from saturated and few-label training lands well below the full-data
result. (The numbers are noisy: 6 test cases, one training run each.) :data:`SYNTH_PRESETS` holds the
named difficulty levels; every knob lives in :class:`SynthConfig`.

The CPU demo cannot train that long. With the real ``cpu-tiny`` preset (ResEnc U-Net 8..64 features, 2 mm,
32^3, AdamW 3e-3) and its 270 fine-tuning iterations, ``medium`` plateaus at test Dice ~0.25 whatever the
number of labels: lesions of radius 3..10 mm are 1.5..5 voxels there, and only the high-contrast lung nodules
get learned (per-lesion hit rates; soft-tissue lesions stayed undetected even after 810 iterations). The
``cpu`` level therefore keeps the ``medium`` confounders but doubles the lesion radius (6..16 mm, 0..4 per
case), which puts lesions at about as many voxels on the 2 mm grid as default lesions have at ~1 mm.
Measured (8 labelled training cases of which the first 2 of a fixed permutation form the 2-case subset,
8 test cases, training seeds 0 / 1 / 2):

=================  ==========================  ==========================
difficulty         8 labelled cases            2 labelled cases
=================  ==========================  ==========================
``cpu``            0.375 / 0.433 / 0.368       0.201 / 0.272 / 0.297
(lesion AP@0.1)    0.70 / 0.63 / 0.67          0.34 / 0.54 / 0.64
=================  ==========================  ==========================

Determinism
-----------
Everything in a case is drawn from the single ``np.random.Generator`` passed to :func:`synthesize_case`.
The dataset writers derive one generator per case from ``SeedSequence(seed, spawn_key=(stream, k))``
with separate streams for training, test and pool cases, so case ``k`` is identical no matter how many
cases are generated, and the unlabelled pool never repeats a labelled case.

Axis conventions: arrays are numpy/SimpleITK order (Z, Y, X); spacing, origin and physical points are
(x, y, z) in mm as SimpleITK reports them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnpre.atomic import write_json, write_with
from nnpre.errors import fail

__all__ = [
    "SynthConfig",
    "SYNTH_PRESETS",
    "SYNTH_CALIBRATION",
    "get_synth_config",
    "SyntheticCase",
    "synthesize_case",
    "case_rng",
    "case_to_sitk",
    "write_nnunet_dataset",
    "write_nndet_dataset",
    "write_unlabeled_pool",
    "make_study",
    "GENERATOR_VERSION",
]

#: Bumped whenever the generator's output for a given seed and config changes; stored in
#: ``nnpre_synth.json`` so that an existing dataset from an older generator is not silently reused.
GENERATOR_VERSION = 1

#: Seed streams: labelled training cases, labelled test cases and unlabelled pool cases.
STREAM_TRAIN, STREAM_TEST, STREAM_POOL = 0, 1, 2

MARKER_FILE = "nnpre_synth.json"
FILE_ENDING = ".nii.gz"

Range = Tuple[float, float]


@dataclass(frozen=True)
class SynthConfig:
    """Calibration knobs of the generator (all physical sizes in mm, intensities in HU).

    Ranges ``(lo, hi)`` are sampled uniformly per case (or per object) unless stated otherwise.
    The defaults and their rationale are described in the module docstring.

    Attributes:
        fov_mm: physical field of view; one number for a cube or ``(x, y, z)``. Default 96 mm: large
            enough for a body with two lungs at realistic lesion sizes, small enough to generate a
            case in well under a second.
        inplane_spacing_mm: x = y spacing range. Default 0.6..0.9 mm (typical chest CT).
        slice_spacing_mm: z spacing range. Default 1.25..3 mm (thin to thick reconstructions).
        origin_jitter_mm: the case centre is drawn uniformly within +-this of the world origin.
        flip_direction_prob: probability that a case gets direction diag(-1, -1, 1) (LPS vs RAS style)
            instead of identity; labels always share the image geometry. Default 0 (off).
        body_semi_axes_frac: ranges of the body's x and y semi-axes as fractions of the FOV half-width
            (values near 1 make the body touch the FOV edge, as in a truncated scan).
        body_length_frac: range of the body's z semi-axis relative to the FOV half-height (>1: the body
            runs through the whole FOV, like a trunk).
        soft_tissue_hu: per-case soft-tissue baseline (muscle/organ ~40 HU).
        soft_tissue_texture_hu: amplitude of the smooth organ texture added to soft tissue.
        fat_hu: fat intensity (subcutaneous layer and islands).
        fat_layer_mm: subcutaneous fat thickness range.
        fat_island_fraction: approximate fraction of the soft tissue turned into fat islands.
        lung_hu: per-case lung parenchyma intensity range.
        lung_texture_hu: amplitude of smooth texture inside the lungs.
        bone_hu: spine intensity range.
        vessel_hu: per-case contrast-enhanced blood intensity.
        n_vessels: number of random vessel trunks (inclusive integer range), besides the aorta.
        vessel_radius_mm: trunk radius range at the start (tapers to 60 % along the trunk).
        vessel_length_mm: trunk length range.
        vessel_tortuosity: direction noise per sqrt(mm) of the persistent random walk (0 = straight).
        vessel_branches: number of side branches per trunk (inclusive integer range).
        vessel_in_lung_fraction: fraction of trunks that start inside a lung.
        aorta_radius_mm: radius range of the aorta-like tube running along z ((0, 0) = no aorta).
        n_lesions: lesions per case (inclusive integer range; 0 allowed).
        lesion_radius_mm: mean radius range, sampled log-uniformly (favours small lesions).
        lesion_elongation: max/min semi-axis ratio range of the rotated ellipsoid.
        lesion_lobulation: relative amplitude of the smooth surface irregularity.
        lesion_site_probs: probabilities of placing a lesion in (lung, soft tissue, touching a vessel).
        lung_lesion_hu: solid lung-nodule intensity range.
        ground_glass_prob / ground_glass_hu: probability and intensity of ground-glass lung nodules.
        lesion_contrast_hu: |lesion - local soft tissue| range for soft-tissue lesions (low contrast).
        hypodense_prob: probability that a soft-tissue lesion is darker than its surroundings.
        enhancing_prob: probability that a non-lung lesion takes vessel-like HU (``vessel_hu``).
        lesion_min_gap_mm: minimum surface gap between lesions, so that every instance is its own
            26-connected component at any spacing up to 3 mm.
        lesion_min_voxels: lesions rasterised to fewer voxels are dropped (image and labels).
        hu_scale / hu_offset: global per-case scanner calibration: HU -> scale * (HU + 1000) - 1000 + offset.
        noise_std_hu: per-case noise standard deviation range.
        noise_correlation_vox: in-plane Gaussian sigma (voxels) that correlates the noise like CT noise.
        bias_mult: strength range of the smooth multiplicative field on (HU + 1000).
        bias_add_hu: strength range of the smooth additive field.
        psf_sigma_mm: Gaussian point-spread blur (partial volume) applied to the clean phantom.
        edge_width_mm: width of the soft (anti-aliased) object boundaries.
        lung_label: also label the lungs (label 2) in the semantic map.
        file_dtype: on-disk image type, "int16" (rounded HU, like scanners) or "float32".
        compression_level: gzip level of the written .nii.gz files (1 = fastest).
    """

    fov_mm: float | Tuple[float, float, float] = 96.0
    inplane_spacing_mm: Range = (0.6, 0.9)
    slice_spacing_mm: Range = (1.25, 3.0)
    origin_jitter_mm: float = 60.0
    flip_direction_prob: float = 0.0
    # anatomy
    body_semi_axes_frac: Tuple[Range, Range] = ((0.84, 0.98), (0.66, 0.84))
    body_length_frac: Range = (1.2, 2.5)
    soft_tissue_hu: Range = (30.0, 55.0)
    soft_tissue_texture_hu: float = 12.0
    fat_hu: float = -100.0
    fat_layer_mm: Range = (2.0, 6.0)
    fat_island_fraction: float = 0.06
    lung_hu: Range = (-880.0, -820.0)
    lung_texture_hu: float = 25.0
    bone_hu: Range = (300.0, 600.0)
    # vessels
    vessel_hu: Range = (150.0, 250.0)
    n_vessels: Tuple[int, int] = (4, 8)
    vessel_radius_mm: Range = (1.0, 2.5)
    vessel_length_mm: Range = (50.0, 130.0)
    vessel_tortuosity: float = 0.18
    vessel_branches: Tuple[int, int] = (0, 2)
    vessel_in_lung_fraction: float = 0.6
    aorta_radius_mm: Range = (3.5, 5.0)
    # lesions
    n_lesions: Tuple[int, int] = (0, 6)
    lesion_radius_mm: Range = (3.0, 10.0)
    lesion_elongation: Range = (1.0, 1.5)
    lesion_lobulation: float = 0.12
    lesion_site_probs: Tuple[float, float, float] = (0.4, 0.4, 0.2)
    lung_lesion_hu: Range = (-100.0, 150.0)
    ground_glass_prob: float = 0.25
    ground_glass_hu: Range = (-650.0, -400.0)
    lesion_contrast_hu: Range = (12.0, 70.0)
    hypodense_prob: float = 0.6
    enhancing_prob: float = 0.2
    lesion_min_gap_mm: float = 6.0
    lesion_min_voxels: int = 4
    # scanner / case variation
    hu_scale: Range = (0.96, 1.04)
    hu_offset: Range = (-25.0, 25.0)
    noise_std_hu: Range = (10.0, 30.0)
    noise_correlation_vox: float = 0.7
    bias_mult: Range = (0.0, 0.04)
    bias_add_hu: Range = (0.0, 20.0)
    psf_sigma_mm: float = 0.5
    edge_width_mm: float = 0.7
    # output
    lung_label: bool = False
    file_dtype: str = "int16"
    compression_level: int = 1

    def __post_init__(self) -> None:
        fov = self.fov_xyz
        if min(fov) <= 0:
            fail(f"SynthConfig.fov_mm must be positive, got {self.fov_mm}")
        for name in ("inplane_spacing_mm", "slice_spacing_mm", "soft_tissue_hu", "fat_layer_mm", "lung_hu",
                     "bone_hu", "vessel_hu", "n_vessels", "vessel_radius_mm", "vessel_length_mm",
                     "vessel_branches", "aorta_radius_mm", "n_lesions", "lesion_radius_mm",
                     "lesion_elongation", "lung_lesion_hu", "ground_glass_hu", "lesion_contrast_hu",
                     "hu_scale", "hu_offset", "noise_std_hu", "bias_mult", "bias_add_hu", "body_length_frac"):
            lo, hi = getattr(self, name)
            if lo > hi:
                fail(f"SynthConfig.{name} must be (low, high) with low <= high, got {(lo, hi)}")
        if min(self.inplane_spacing_mm[0], self.slice_spacing_mm[0]) <= 0:
            fail("SynthConfig spacings must be positive")
        if min(self.n_lesions) < 0 or min(self.n_vessels) < 0 or min(self.lesion_radius_mm) <= 0:
            fail("SynthConfig counts must be >= 0 and lesion radii > 0")
        probs = np.asarray(self.lesion_site_probs, dtype=float)
        if probs.shape != (3,) or probs.min() < 0 or probs.sum() <= 0:
            fail(f"SynthConfig.lesion_site_probs must be 3 non-negative weights, got {self.lesion_site_probs}")
        if self.file_dtype not in ("int16", "float32"):
            fail(f"SynthConfig.file_dtype must be 'int16' or 'float32', got {self.file_dtype!r}")

    @property
    def fov_xyz(self) -> Tuple[float, float, float]:
        """Field of view as (x, y, z) mm."""
        if isinstance(self.fov_mm, (int, float)):
            return (float(self.fov_mm),) * 3
        fov = tuple(float(v) for v in self.fov_mm)
        if len(fov) != 3:
            fail(f"SynthConfig.fov_mm must be one number or (x, y, z), got {self.fov_mm}")
        return fov  # type: ignore[return-value]

    def to_dict(self) -> dict:
        """JSON-compatible dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


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


_MEDIUM = dict(lesion_contrast_hu=(25.0, 90.0), noise_std_hu=(8.0, 22.0), enhancing_prob=0.1,
               bias_mult=(0.0, 0.02), bias_add_hu=(0.0, 10.0), n_vessels=(2, 5))

#: Named difficulty levels. "default" is the calibrated task described in the module docstring; "medium"
#: halves the confounders; "cpu" is "medium" with lesions twice as large (radius 6..16 mm, 0..4 per case) so
#: that at the 2 mm grid of the ``cpu-tiny`` preset they span as many voxels as default lesions do at ~1 mm
#: (the CPU demo's task, see "Calibration"); "easy" is the bright-spheres sanity task (high-contrast
#: soft-tissue lesions, no vessels, little noise, no bias) on which a tiny nnU-Net converges within a few
#: hundred iterations.
SYNTH_PRESETS: Dict[str, SynthConfig] = {
    "default": SynthConfig(),
    "medium": SynthConfig(**_MEDIUM),
    "cpu": SynthConfig(**_MEDIUM, lesion_radius_mm=(6.0, 16.0), n_lesions=(0, 4)),
    "easy": SynthConfig(lesion_contrast_hu=(150.0, 250.0), hypodense_prob=0.0, enhancing_prob=0.0,
                        n_vessels=(0, 0), aorta_radius_mm=(0.0, 0.0), noise_std_hu=(10.0, 10.0),
                        bias_mult=(0.0, 0.0), bias_add_hu=(0.0, 0.0), hu_scale=(1.0, 1.0), hu_offset=(0.0, 0.0),
                        lesion_site_probs=(0.0, 1.0, 0.0), fat_island_fraction=0.0,
                        lesion_radius_mm=(5.0, 10.0), n_lesions=(1, 5)),
}


#: One line per difficulty level for reports: what it is and how it was calibrated (see the module docstring).
SYNTH_CALIBRATION: Dict[str, str] = {
    "default": "low-contrast (12-70 HU) lesions of radius 3-10 mm, vessel and fat confounders, per-case intensity "
               "variation; proxy tiny U-Net, 600 iterations: test Dice 0.16-0.33 with 10 labelled cases, "
               "0.08-0.13 with 2",
    "medium": "the default task with half the confounders (contrast 25-90 HU, less noise and bias, fewer "
              "vessels); proxy tiny U-Net, 600 iterations: Dice 0.28 with 10 labelled cases, 0.09 with 2",
    "cpu": "'medium' with lesions of radius 6-16 mm (as many voxels on the 2 mm cpu-tiny grid as default lesions "
           "at 1 mm); cpu-tiny, 270 AdamW iterations from scratch, 3 seeds: test Dice 0.37-0.43 with 8 labelled "
           "cases, 0.20-0.30 with 2",
    "easy": "bright (150-250 HU) soft-tissue spheres, no vessels, no bias: a sanity task that saturates "
            "(cpu-tiny, 400 iterations: Dice 0.91 with 8 labelled cases, 0.88 with 2)",
}


def get_synth_config(name: str = "default", **overrides) -> SynthConfig:
    """The named difficulty level from :data:`SYNTH_PRESETS` with ``overrides`` applied (e.g. ``fov_mm=64``)."""
    if name not in SYNTH_PRESETS:
        fail(f"unknown synthetic difficulty {name!r}; choose one of {sorted(SYNTH_PRESETS)}")
    try:
        return dataclasses.replace(SYNTH_PRESETS[name], **overrides)
    except TypeError as e:
        fail(f"bad SynthConfig override: {e}")


# ----------------------------------------------------------------------------------------------------
# Grid and smooth fields
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates (mm, centred on the FOV centre) of a case's sampling grid."""

    spacing: Tuple[float, float, float]  # x, y, z
    shape: Tuple[int, int, int]  # Z, Y, X
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @classmethod
    def make(cls, spacing: Sequence[float], fov: Sequence[float]) -> "_Grid":
        n = [max(8, int(round(f / s))) for f, s in zip(fov, spacing)]  # x, y, z
        axes = [((np.arange(k) - (k - 1) / 2.0) * s).astype(np.float32) for k, s in zip(n, spacing)]
        return cls(tuple(float(s) for s in spacing), (n[2], n[1], n[0]), axes[0], axes[1], axes[2])

    def full(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (x, y, z) coordinate arrays for the whole grid."""
        return self.x[None, None, :], self.y[None, :, None], self.z[:, None, None]

    def box(self, lo: np.ndarray, hi: np.ndarray):
        """Index slices and broadcastable coordinates of the voxels whose centres lie in [lo, hi] (x, y, z).

        Returns ``None`` if the box misses the grid.
        """
        idx = []
        for axis, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            idx.append(slice(i0, i1))
        sl = tuple(idx)
        return sl, (self.x[None, None, sl[2]], self.y[None, sl[1], None], self.z[sl[0], None, None])


@dataclass(frozen=True)
class _CosineField:
    """Smooth random field f(x, y, z) = sum_k a_k cos(wx_k x + px_k) cos(wy_k y + py_k) cos(wz_k z + pz_k).

    Evaluates with broadcasting, so it works both on grid coordinate arrays and on point arrays. The
    amplitudes are normalised so that the field's standard deviation is about 1.
    """

    amps: np.ndarray  # (K,)
    freqs: np.ndarray  # (K, 3) rad/mm
    phases: np.ndarray  # (K, 3)

    @classmethod
    def sample(cls, rng: np.random.Generator, n_terms: int, wavelength_mm: Range) -> "_CosineField":
        wl = np.exp(rng.uniform(np.log(wavelength_mm[0]), np.log(wavelength_mm[1]), size=(n_terms, 3)))
        freqs = 2 * np.pi / wl * rng.choice([-1.0, 1.0], size=(n_terms, 3))
        phases = rng.uniform(0, 2 * np.pi, size=(n_terms, 3))
        amps = rng.normal(size=n_terms)
        amps = amps / np.sqrt(np.sum(amps ** 2) / 8.0)  # E[cos^2]^3 = 1/8 per term
        return cls(amps.astype(np.float32), freqs.astype(np.float32), phases.astype(np.float32))

    def __call__(self, x, y, z) -> np.ndarray:
        out = None
        for a, (fx, fy, fz), (px, py, pz) in zip(self.amps, self.freqs, self.phases):
            term = (a * np.cos(fx * x + px)) * np.cos(fy * y + py) * np.cos(fz * z + pz)
            out = term if out is None else out + term
        return np.asarray(out, dtype=np.float32)


def _soft(signed_mm: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased occupancy in [0, 1] from a signed inside-distance in mm (positive inside)."""
    return np.clip(0.5 + signed_mm / edge, 0.0, 1.0).astype(np.float32)


def _composite(image: np.ndarray, occ: np.ndarray, value) -> None:
    """In place: image <- image * (1 - occ) + value * occ."""
    image += occ * (value - image)


# ----------------------------------------------------------------------------------------------------
# Scene (physical description in mm)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ellipsoid:
    """Axis-aligned ellipsoid with optional smooth coordinate warp; ``rho`` < 1 inside."""

    center: np.ndarray  # (3,) x, y, z
    semi: np.ndarray  # (3,)
    warp: Optional[Tuple[_CosineField, _CosineField, _CosineField]] = None
    warp_mm: float = 0.0

    def rho(self, x, y, z) -> np.ndarray:
        dx, dy, dz = x - self.center[0], y - self.center[1], z - self.center[2]
        if self.warp is not None:
            dx = dx + self.warp_mm * self.warp[0](x, y, z)
            dy = dy + self.warp_mm * self.warp[1](x, y, z)
            dz = dz + self.warp_mm * self.warp[2](x, y, z)
        return np.sqrt((dx / self.semi[0]) ** 2 + (dy / self.semi[1]) ** 2 + (dz / self.semi[2]) ** 2)

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        r = self.semi + 2 * self.warp_mm + 1.0
        return self.center - r, self.center + r


@dataclass(frozen=True)
class _Tube:
    """Polyline centreline (P, 3) mm with per-point radii (P,) mm."""

    points: np.ndarray
    radii: np.ndarray


@dataclass(frozen=True)
class _Lesion:
    center: np.ndarray  # (3,) mm
    radius: float  # mean radius mm
    semi: np.ndarray  # (3,) semi-axes mm
    rotation: np.ndarray  # (3, 3), columns = axes
    lobe_dirs: np.ndarray  # (3, 3) unit vectors (rows)
    lobe_phases: np.ndarray  # (3,)
    lobulation: float
    hu: float
    site: str
    kind: str
    contrast: float  # lesion HU - local background HU (clean phantom)

    @property
    def extent(self) -> float:
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
class _Scene:
    fov: np.ndarray
    body: _Ellipsoid
    fat_layer_mm: float
    soft_hu: float
    texture: _CosineField
    fat_field: _CosineField
    fat_threshold: float
    lungs: Tuple[_Ellipsoid, _Ellipsoid]
    lung_hu: float
    lung_texture: _CosineField
    spine_center: np.ndarray  # (2,) x, y
    spine_radius: float
    bone_hu: float
    vessels: Tuple[_Tube, ...]
    vessel_hu: float

    # --- analytic region tests at arbitrary points (used for lesion placement) ---
    def in_body_core(self, x, y, z) -> np.ndarray:
        rho = self.body.rho(x, y, z)
        return (1.0 - rho) * float(self.body.semi[:2].min()) > self.fat_layer_mm + 1.0

    def in_lung(self, x, y, z) -> np.ndarray:
        return np.minimum(self.lungs[0].rho(x, y, z), self.lungs[1].rho(x, y, z)) < 1.0

    def in_bone(self, x, y, z) -> np.ndarray:
        r = np.sqrt((x - self.spine_center[0]) ** 2 + (y - self.spine_center[1]) ** 2)
        return r < self.spine_radius + 1.0

    def soft_hu_at(self, x, y, z) -> np.ndarray:
        return self.soft_hu + self._texture_amp * self.texture(x, y, z)

    _texture_amp: float = 12.0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _random_tube(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float,
                 radius: float, tortuosity: float, keep: Callable[[np.ndarray], bool], step: float = 1.5,
                 taper: float = 0.6) -> Optional[_Tube]:
    """Persistent random walk from ``start`` (mm) that stops when ``keep(point)`` turns false."""
    n = max(2, int(length / step))
    noise = rng.normal(size=(n, 3)) * tortuosity * np.sqrt(step)
    noise = ndimage.gaussian_filter1d(noise, sigma=2.0, axis=0, mode="nearest") * 2.0
    pts = [np.asarray(start, dtype=float)]
    d = _unit(np.asarray(direction, dtype=float))
    for k in range(n):
        d = _unit(d + noise[k])
        p = pts[-1] + step * d
        if not keep(p):
            break
        pts.append(p)
    if len(pts) < 3:
        return None
    pts_a = np.asarray(pts)
    radii = radius * (1.0 - (1.0 - taper) * np.linspace(0.0, 1.0, len(pts_a)))
    return _Tube(pts_a, radii)


def _sample_scene(rng: np.random.Generator, cfg: SynthConfig, fov: np.ndarray) -> _Scene:
    half = fov / 2.0
    # body
    (ax_lo, ax_hi), (ay_lo, ay_hi) = cfg.body_semi_axes_frac
    semi_b = np.array([rng.uniform(ax_lo, ax_hi) * half[0], rng.uniform(ay_lo, ay_hi) * half[1],
                       rng.uniform(*cfg.body_length_frac) * half[2]])
    center_b = np.array([rng.uniform(-0.03, 0.03) * fov[0], rng.uniform(-0.03, 0.03) * fov[1], 0.0])
    body = _Ellipsoid(center_b, semi_b)
    fat_layer = rng.uniform(*cfg.fat_layer_mm)
    soft_hu = rng.uniform(*cfg.soft_tissue_hu)
    texture = _CosineField.sample(rng, 6, (15.0, 60.0))
    fat_field = _CosineField.sample(rng, 6, (12.0, 40.0))
    # fat islands where the (unit-std) field exceeds the upper tail quantile
    fat_threshold = 1e9
    if cfg.fat_island_fraction > 0:
        fat_threshold = float(np.sqrt(2.0) * _erfinv(1.0 - 2.0 * cfg.fat_island_fraction))

    # lungs: left/right warped ellipsoids, shrunk until they sit inside the body
    lungs = []
    for side in (-1.0, 1.0):
        scale = 1.0
        cx = center_b[0] + side * rng.uniform(0.42, 0.52) * semi_b[0]
        cy = center_b[1] - rng.uniform(0.0, 0.15) * semi_b[1]
        cz = rng.uniform(-0.2, 0.2) * fov[2]
        semi = np.array([rng.uniform(0.28, 0.36) * semi_b[0], rng.uniform(0.55, 0.7) * semi_b[1],
                         rng.uniform(0.8, 1.6) * half[2]])
        warp = tuple(_CosineField.sample(rng, 3, (25.0, 60.0)) for _ in range(3))
        warp_mm = 0.08 * float(semi[:2].min())
        for _ in range(20):
            lung = _Ellipsoid(np.array([cx, cy, cz]), semi * scale, warp, warp_mm * scale)
            # surface samples of the lung must lie inside the body core
            u = _fibonacci_sphere(64)
            pts = lung.center + u * (lung.semi + lung.warp_mm)
            if np.all(body.rho(pts[:, 0], pts[:, 1], pts[:, 2]) < 1.0 - (fat_layer + 3.0) / semi_b[:2].min()):
                break
            scale *= 0.93
        lungs.append(lung)
    lung_hu = rng.uniform(*cfg.lung_hu)
    lung_texture = _CosineField.sample(rng, 4, (6.0, 20.0))

    # spine: cylinder along z, posterior midline
    spine_r = rng.uniform(0.13, 0.17) * semi_b[0]
    spine_c = np.array([center_b[0] + rng.uniform(-1.0, 1.0),
                        center_b[1] + semi_b[1] - fat_layer - spine_r - 0.15 * semi_b[1]])
    bone_hu = rng.uniform(*cfg.bone_hu)

    # vessels
    vessel_hu = rng.uniform(*cfg.vessel_hu)

    def in_body(p: np.ndarray) -> bool:
        r = np.sqrt((p[0] - spine_c[0]) ** 2 + (p[1] - spine_c[1]) ** 2)
        return bool(body.rho(p[0], p[1], p[2]) < 0.93 and r > spine_r + 1.5 and np.all(np.abs(p) < half + 5.0))

    tubes: List[_Tube] = []
    # aorta: anterior-left of the spine, roughly along z
    ar = rng.uniform(*cfg.aorta_radius_mm)
    a_start = np.array([spine_c[0] - rng.uniform(0.5, 1.0) * spine_r - ar, spine_c[1] - spine_r - ar - 1.5,
                        -half[2] - 5.0])
    aorta = _random_tube(rng, a_start, np.array([0.0, 0.0, 1.0]), fov[2] + 10.0, ar, 0.03,
                         lambda p: bool(np.abs(p[2]) < half[2] + 6.0), step=2.0, taper=1.0)
    if aorta is not None and ar > 0:
        tubes.append(aorta)
    n_vessels = int(rng.integers(cfg.n_vessels[0], cfg.n_vessels[1] + 1))
    lungs_t = tuple(lungs)
    for _ in range(n_vessels):
        if rng.random() < cfg.vessel_in_lung_fraction:
            lung = lungs_t[int(rng.integers(2))]
            start = lung.center + rng.uniform(-0.6, 0.6, size=3) * lung.semi
        else:
            start = center_b + rng.uniform(-0.6, 0.6, size=3) * np.array([semi_b[0], semi_b[1], half[2]])
        if not in_body(start):
            continue
        length = rng.uniform(*cfg.vessel_length_mm)
        radius = rng.uniform(*cfg.vessel_radius_mm)
        direction = _unit(rng.normal(size=3))
        trunk_parts = []
        for sgn in (1.0, -1.0):  # grow both ways from the start so vessels traverse the FOV
            t = _random_tube(rng, start, sgn * direction, length / 2, radius, cfg.vessel_tortuosity, in_body)
            if t is not None:
                trunk_parts.append(t)
        for t in trunk_parts:
            tubes.append(t)
            for _b in range(int(rng.integers(cfg.vessel_branches[0], cfg.vessel_branches[1] + 1))):
                i = int(rng.integers(1, len(t.points) - 1))
                d0 = _unit(t.points[i + 1] - t.points[i - 1])
                d = _unit(d0 + rng.normal(size=3) * 0.9)
                br = _random_tube(rng, t.points[i], d, length * rng.uniform(0.2, 0.5), t.radii[i] * 0.65,
                                  cfg.vessel_tortuosity, in_body)
                if br is not None:
                    tubes.append(br)
    scene = _Scene(fov=fov, body=body, fat_layer_mm=fat_layer, soft_hu=soft_hu, texture=texture,
                   fat_field=fat_field, fat_threshold=fat_threshold, lungs=lungs_t, lung_hu=lung_hu,
                   lung_texture=lung_texture, spine_center=spine_c, spine_radius=spine_r, bone_hu=bone_hu,
                   vessels=tuple(tubes), vessel_hu=vessel_hu, _texture_amp=cfg.soft_tissue_texture_hu)
    return scene


def _erfinv(y: float) -> float:
    from scipy.special import erfinv

    return float(erfinv(y))


def _fibonacci_sphere(n: int) -> np.ndarray:
    """(n, 3) roughly uniform unit vectors (deterministic)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _distance_to_tubes(p: np.ndarray, tubes: Sequence[_Tube]) -> Tuple[float, int, int]:
    """Smallest (distance - radius) from point p to any tube and the (tube, point) index reaching it."""
    best = (np.inf, -1, -1)
    for ti, t in enumerate(tubes):
        d = np.linalg.norm(t.points - p, axis=1) - t.radii
        j = int(np.argmin(d))
        if d[j] < best[0]:
            best = (float(d[j]), ti, j)
    return best


def _sample_lesions(rng: np.random.Generator, cfg: SynthConfig, scene: _Scene) -> List[_Lesion]:
    n = int(rng.integers(cfg.n_lesions[0], cfg.n_lesions[1] + 1))
    probs = np.asarray(cfg.lesion_site_probs, dtype=float)
    probs = probs / probs.sum()
    half = scene.fov / 2.0
    lesions: List[_Lesion] = []
    sphere = _fibonacci_sphere(26)
    for _ in range(n):
        site = ("lung", "soft", "vessel")[int(rng.choice(3, p=probs))]
        for _attempt in range(60):
            radius = float(np.exp(rng.uniform(np.log(cfg.lesion_radius_mm[0]), np.log(cfg.lesion_radius_mm[1]))))
            elong = rng.uniform(*cfg.lesion_elongation)
            semi = radius * np.array([elong ** (2 / 3), elong ** (-1 / 3), elong ** (-1 / 3)])
            rot = _random_rotation(rng)
            lobe_dirs = np.array([_unit(v) for v in rng.normal(size=(3, 3))])
            lobe_phases = rng.uniform(0, 2 * np.pi, size=3)
            ext = float(semi.max() * (1 + cfg.lesion_lobulation) + 0.5)
            if site == "lung":
                lung = scene.lungs[int(rng.integers(2))]
                c = lung.center + rng.uniform(-0.8, 0.8, size=3) * lung.semi
            elif site == "soft":
                c = scene.body.center + rng.uniform(-0.85, 0.85, size=3) * np.array(
                    [scene.body.semi[0], scene.body.semi[1], half[2]])
            else:
                if not scene.vessels:
                    continue
                t = scene.vessels[int(rng.integers(len(scene.vessels)))]
                j = int(rng.integers(len(t.points)))
                tang = t.points[min(j + 1, len(t.points) - 1)] - t.points[max(j - 1, 0)]
                perp = _unit(np.cross(_unit(tang), _unit(rng.normal(size=3))))
                c = t.points[j] + perp * (t.radii[j] + radius * rng.uniform(0.6, 0.95))
            # whole lesion inside the FOV
            if np.any(np.abs(c) + ext > half - 1.0):
                continue
            # separated from earlier lesions
            if any(np.linalg.norm(c - o.center) < ext + o.extent + cfg.lesion_min_gap_mm for o in lesions):
                continue
            pts = c + sphere * (radius * 0.9)
            px, py, pz = pts[:, 0], pts[:, 1], pts[:, 2]
            in_lung_c = bool(scene.in_lung(*c))
            if site == "lung":
                if not in_lung_c or scene.in_lung(px, py, pz).mean() < 0.7 or scene.in_bone(px, py, pz).any():
                    continue
            elif site == "soft":
                if (not scene.in_body_core(px, py, pz).all() or scene.in_lung(px, py, pz).any()
                        or scene.in_bone(px, py, pz).any()):
                    continue
                if _distance_to_tubes(c, scene.vessels)[0] < radius + 1.0:
                    continue  # keep "soft" lesions apart from vessels; the vessel site covers contact
            else:
                if not scene.in_body_core(px, py, pz).all() or scene.in_bone(px, py, pz).any():
                    continue
            # intensity
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
            lesions.append(_Lesion(center=c, radius=radius, semi=semi, rotation=rot, lobe_dirs=lobe_dirs,
                                   lobe_phases=lobe_phases, lobulation=cfg.lesion_lobulation, hu=float(hu),
                                   site=site, kind=kind, contrast=float(hu - background)))
            break
    return lesions


# ----------------------------------------------------------------------------------------------------
# Rendering on the case grid
# ----------------------------------------------------------------------------------------------------


def _render_tube(grid: _Grid, tube: _Tube, occ: np.ndarray, edge: float, chunk: int = 12) -> None:
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
        np.maximum(occ[sl], _soft(best, edge), out=occ[sl])


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


def synthesize_case(rng: np.random.Generator, config: Optional[SynthConfig] = None, channels: int = 1) -> SyntheticCase:
    """Generate one CT-like case from ``rng`` (all randomness comes from it).

    Args:
        rng: the case's generator; the same generator state always gives the same case.
        config: calibration knobs; ``None`` means ``SynthConfig()``.
        channels: 1 (CT) or 2 (CT plus a non-linearly remapped second contrast with independent noise).

    Returns:
        A :class:`SyntheticCase` with image (C, Z, Y, X) float32, semantic/instance maps (Z, Y, X),
        spacing/origin (x, y, z) mm and a 9-element direction.
    """
    cfg = config or SynthConfig()
    if channels not in (1, 2):
        fail(f"channels must be 1 or 2, got {channels}")
    fov = np.asarray(cfg.fov_xyz, dtype=float)

    # --- geometry of this case ---
    s_in = rng.uniform(*cfg.inplane_spacing_mm)
    s_z = rng.uniform(*cfg.slice_spacing_mm)
    grid = _Grid.make((s_in, s_in, s_z), fov)
    nz, ny, nx = grid.shape
    flip = rng.random() < cfg.flip_direction_prob
    direction = np.diag([-1.0, -1.0, 1.0]) if flip else np.eye(3)
    world_center = rng.uniform(-cfg.origin_jitter_mm, cfg.origin_jitter_mm, size=3)
    first_voxel_local = np.array([grid.x[0], grid.y[0], grid.z[0]], dtype=float)
    origin = world_center + direction @ first_voxel_local

    # --- physical scene ---
    scene = _sample_scene(rng, cfg, fov)
    lesions = _sample_lesions(rng, cfg, scene)
    edge = cfg.edge_width_mm

    # --- clean phantom ---
    x, y, z = grid.full()
    img = np.full(grid.shape, -1000.0, dtype=np.float32)
    body_rho = scene.body.rho(x, y, z).astype(np.float32)
    depth = (1.0 - body_rho) * float(scene.body.semi[:2].min())  # ~ mm below the skin
    body_occ = _soft(depth, edge)
    tissue = scene.soft_hu_at(x, y, z)
    fat = np.maximum(_soft(scene.fat_layer_mm - depth, edge),
                     _soft((scene.fat_field(x, y, z) - scene.fat_threshold) * 6.0, edge))
    _composite(tissue, fat, np.float32(cfg.fat_hu))
    _composite(img, body_occ, tissue)
    del tissue, fat, depth

    lung_hard = np.zeros(grid.shape, dtype=bool)
    for lung in scene.lungs:
        got = grid.box(*lung.bounds())
        if got is None:
            continue
        sl, (bx, by, bz) = got
        rho = lung.rho(bx, by, bz)
        occ = _soft((1.0 - rho) * float(lung.semi[:2].min()), edge) * body_occ[sl]
        lung_val = scene.lung_hu + cfg.lung_texture_hu * scene.lung_texture(bx, by, bz)
        _composite(img[sl], occ, lung_val)
        lung_hard[sl] |= (rho < 1.0) & (body_rho[sl] < 1.0)

    r_sp = np.sqrt((x - scene.spine_center[0]) ** 2 + (y - scene.spine_center[1]) ** 2)
    bone_occ = _soft(scene.spine_radius - r_sp, edge) * body_occ
    _composite(img, bone_occ, np.float32(scene.bone_hu))

    vessel_occ = np.zeros(grid.shape, dtype=np.float32)
    for tube in scene.vessels:
        _render_tube(grid, tube, vessel_occ, edge)
    vessel_occ *= body_occ * (1.0 - bone_occ)
    _composite(img, vessel_occ, np.float32(scene.vessel_hu))
    del vessel_occ, bone_occ, r_sp

    instances = np.zeros(grid.shape, dtype=np.int16)
    kept: List[_Lesion] = []
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
        _composite(img[sl], _soft(inside, edge), np.float32(les.hu))
        kept.append(les)
        instances[sl][hard] = len(kept)

    # --- scanner: partial volume, bias, calibration, noise ---
    sigma_vox = [cfg.psf_sigma_mm / s for s in (grid.spacing[2], grid.spacing[1], grid.spacing[0])]
    if cfg.psf_sigma_mm > 0:
        img = ndimage.gaussian_filter(img, sigma=sigma_vox, mode="nearest", truncate=3.0)
    bias_m = rng.uniform(*cfg.bias_mult)
    bias_a = rng.uniform(*cfg.bias_add_hu)
    f_mult = _CosineField.sample(rng, 4, (80.0, 250.0))
    f_add = _CosineField.sample(rng, 4, (60.0, 200.0))
    scale = rng.uniform(*cfg.hu_scale)
    offset = rng.uniform(*cfg.hu_offset)
    clean = (img + 1000.0) * (1.0 + bias_m * np.clip(f_mult(x, y, z), -2.5, 2.5)) * scale - 1000.0
    clean += offset + bias_a * np.clip(f_add(x, y, z), -2.5, 2.5)
    del img
    noise_std = rng.uniform(*cfg.noise_std_hu)
    ch0 = clean + noise_std * _smooth_noise(rng, grid.shape, cfg.noise_correlation_vox)
    chans = [np.clip(ch0, -1024.0, 3071.0)]
    if channels == 2:
        ch1 = _second_contrast(clean) + 0.7 * noise_std * _smooth_noise(rng, grid.shape, cfg.noise_correlation_vox)
        chans.append(ch1)
    image = np.stack(chans).astype(np.float32, copy=False)

    semantic = (instances > 0).astype(np.uint8)
    if cfg.lung_label:
        semantic[lung_hard & (instances == 0)] = 2

    info = {
        "spacing": [float(s) for s in grid.spacing],
        "shape_zyx": list(grid.shape),
        "noise_std_hu": float(noise_std),
        "hu_scale": float(scale),
        "hu_offset": float(offset),
        "bias_mult": float(bias_m),
        "bias_add_hu": float(bias_a),
        "soft_tissue_hu": float(scene.soft_hu),
        "vessel_hu": float(scene.vessel_hu),
        "n_vessels": len(scene.vessels),
        "flipped": bool(flip),
        "lesions": [
            {"instance": i + 1, "site": les.site, "kind": les.kind, "radius_mm": round(les.radius, 3),
             "hu": round(les.hu, 2), "contrast_hu": round(les.contrast, 2),
             "center_mm": [round(float(v), 3) for v in les.center]}
            for i, les in enumerate(kept)
        ],
    }
    return SyntheticCase(
        image=image, semantic=semantic, instances=instances,
        instance_classes={i + 1: 0 for i in range(len(kept))},
        spacing=tuple(float(s) for s in grid.spacing),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),
        info=info,
    )


# ----------------------------------------------------------------------------------------------------
# Seeds and SimpleITK conversion
# ----------------------------------------------------------------------------------------------------


def case_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """Generator of case ``index`` in ``stream`` (train/test/pool); independent of how many cases exist."""
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(int(stream), int(index))))


def _to_sitk(array: np.ndarray, case: SyntheticCase):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(case.spacing)
    img.SetOrigin(case.origin)
    img.SetDirection(case.direction)
    return img


def case_to_sitk(case: SyntheticCase, file_dtype: str = "float32"):
    """(list of per-channel images, semantic label image, instance label image) as SimpleITK images."""
    dtype = np.int16 if file_dtype == "int16" else np.float32
    chans = []
    for c in case.image:
        arr = np.rint(np.clip(c, -32768, 32767)).astype(np.int16) if dtype == np.int16 else c.astype(np.float32)
        chans.append(_to_sitk(arr, case))
    return chans, _to_sitk(case.semantic.astype(np.uint8), case), _to_sitk(case.instances.astype(np.int16), case)


def _write_image(img, path: str, level: int) -> None:
    import SimpleITK as sitk

    def writer(tmp: str) -> None:
        w = sitk.ImageFileWriter()
        w.SetFileName(tmp)
        w.SetUseCompression(True)
        w.SetCompressionLevel(int(level))
        w.Execute(img)

    write_with(writer, path)


# ----------------------------------------------------------------------------------------------------
# Dataset folders
# ----------------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name or ""):
        fail(f"dataset name {name!r} may only contain letters, digits, '_' and '-' (no dots or spaces)")


def _check_id(dataset_id: int) -> None:
    if not (isinstance(dataset_id, (int, np.integer)) and 1 <= int(dataset_id) <= 999):
        fail(f"dataset id must be an integer in 1..999, got {dataset_id!r}")


def _check_id_free(parent: str, prefix: str, folder_name: str) -> None:
    """Refuse an id already used by a folder with a different name (nnU-Net resolves ids by prefix)."""
    if not os.path.isdir(parent):
        return
    for other in sorted(os.listdir(parent)):
        if other.startswith(prefix + "_") and other != folder_name and os.path.isdir(os.path.join(parent, other)):
            fail(f"id {prefix} is already used by {os.path.join(parent, other)}; "
                 "choose another id or delete that folder")


def _prepare_folder(folder: str, spec: dict, overwrite: bool) -> bool:
    """Make ``folder`` ready for (re)generation; returns True if it is already complete for ``spec``.

    An existing folder is reused only when its ``nnpre_synth.json`` records exactly ``spec`` (generation is
    deterministic, so missing files of an interrupted run are regenerated identically). Any other
    existing non-empty folder is an error unless ``overwrite``.
    """
    spec = json.loads(json.dumps(spec))
    marker = os.path.join(folder, MARKER_FILE)
    if os.path.isdir(folder) and os.listdir(folder):
        old = None
        if os.path.isfile(marker):
            try:
                with open(marker, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None
        if old is not None and old.get("spec") == spec:
            return bool(old.get("complete"))
        if not overwrite:
            why = "was generated with different settings" if old is not None else "was not generated by nnPre_synth"
            fail(f"{folder} already exists and {why}; delete it or pass --overwrite (overwrite=True)")
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    write_json({"spec": spec, "complete": False}, marker)
    return False


def _finish_folder(folder: str, spec: dict) -> None:
    write_json({"spec": json.loads(json.dumps(spec)), "complete": True}, os.path.join(folder, MARKER_FILE))


def _spec(kind: str, dataset_id: int, name: str, seed: int, cfg: SynthConfig, channels: int, **counts) -> dict:
    return {"generator": "nnpre.synthetic", "version": GENERATOR_VERSION, "kind": kind, "id": int(dataset_id),
            "name": name, "seed": int(seed), "channels": int(channels), **counts, "config": cfg.to_dict()}


def _channel_names(channels: int) -> Dict[str, str]:
    return {"0": "CT"} if channels == 1 else {"0": "CT", "1": "CT2"}


class _Layout:
    """Where the files of one case go in one dataset format, and how to write them."""

    def __init__(self, folder: str, kind: str, level: int, file_dtype: str):
        self.folder, self.kind, self.level, self.file_dtype = folder, kind, level, file_dtype
        self.base = os.path.join(folder, "raw_splitted") if kind == "nndet" else folder

    def files(self, split: str, case_id: str, channels: int) -> List[str]:
        imgs = [os.path.join(self.base, f"images{split}", f"{case_id}_{c:04d}{FILE_ENDING}") for c in range(channels)]
        if self.kind == "pool":
            return imgs
        lab = os.path.join(self.base, f"labels{split}", f"{case_id}{FILE_ENDING}")
        extra = [os.path.join(self.base, f"labels{split}", f"{case_id}.json")] if self.kind == "nndet" else []
        return imgs + [lab] + extra

    def complete(self, split: str, case_id: str, channels: int) -> bool:
        return all(os.path.isfile(p) for p in self.files(split, case_id, channels))

    def write(self, split: str, case_id: str, case: SyntheticCase) -> None:
        paths = self.files(split, case_id, case.image.shape[0])
        chans, sem, inst = case_to_sitk(case, self.file_dtype)
        for img, p in zip(chans, paths):
            if not os.path.isfile(p):
                _write_image(img, p, self.level)
        if self.kind == "nnunet":
            if not os.path.isfile(paths[-1]):
                _write_image(sem, paths[-1], self.level)
        elif self.kind == "nndet":
            lab, js = paths[-2], paths[-1]
            if not os.path.isfile(lab):
                _write_image(inst, lab, self.level)
            write_json({"instances": {str(k): int(v) for k, v in case.instance_classes.items()}}, js)


def _case_ids(prefix: str, n: int) -> List[str]:
    return [f"{prefix}_{k:04d}" for k in range(n)]


def _generate(layouts: List[_Layout], jobs: List[Tuple[str, str, int, int]], seed: int, cfg: SynthConfig,
              channels: int, progress: bool, desc: str) -> None:
    """Synthesize each (split, case_id, stream, index) job once and write it to every layout that lacks it."""
    from tqdm import tqdm

    for split, case_id, stream, index in tqdm(jobs, desc=desc, disable=not progress, unit="case"):
        todo = [lay for lay in layouts if not lay.complete(split, case_id, channels)]
        if not todo:
            continue
        case = synthesize_case(case_rng(seed, stream, index), cfg, channels)
        for lay in todo:
            lay.write(split, case_id, case)


def _labelled_jobs(n_train: int, n_test: int) -> List[Tuple[str, str, int, int]]:
    return ([("Tr", cid, STREAM_TRAIN, k) for k, cid in enumerate(_case_ids("train", n_train))]
            + [("Ts", cid, STREAM_TEST, k) for k, cid in enumerate(_case_ids("test", n_test))])


def _resolve_cfg(config: Optional[SynthConfig], lung_label: bool) -> SynthConfig:
    cfg = config or SynthConfig()
    if lung_label and not cfg.lung_label:
        cfg = dataclasses.replace(cfg, lung_label=True)
    return cfg


def _check_counts(**counts: int) -> None:
    for k, v in counts.items():
        if int(v) < 0:
            fail(f"{k} must be >= 0, got {v}")


def _nnunet_dataset_json(cfg: SynthConfig, channels: int, n_train: int, name: str) -> dict:
    labels = {"background": 0, "lesion": 1}
    if cfg.lung_label:
        labels["lung"] = 2
    return {"name": name, "description": "nnpre synthetic CT-like lesion data (nnpre.synthetic)",
            "channel_names": _channel_names(channels), "labels": labels, "numTraining": int(n_train),
            "file_ending": FILE_ENDING}


def _nndet_dataset_json(task: str, name: str, channels: int) -> dict:
    mods = {"0": "CT"} if channels == 1 else {"0": "CT", "1": "CT2"}
    return {"task": task, "name": name, "dim": 3, "labels": {"0": "lesion"}, "modalities": mods,
            "test_labels": True}


def _labelled(out_raw: Optional[str], nndet_root: Optional[str], dataset_id: int, name: str, n_train: int,
              n_test: int, seed: int, cfg: SynthConfig, channels: int, overwrite: bool,
              progress: bool) -> Dict[str, str]:
    _check_id(dataset_id)
    _check_name(name)
    _check_counts(n_train=n_train, n_test=n_test)
    if n_train < 1:
        fail("n_train must be >= 1 for a labelled dataset")
    if channels not in (1, 2):
        fail(f"channels must be 1 or 2, got {channels}")
    layouts, specs, done = [], [], {}
    if out_raw is not None:
        folder = os.path.join(os.fspath(out_raw), f"Dataset{int(dataset_id):03d}_{name}")
        _check_id_free(os.fspath(out_raw), f"Dataset{int(dataset_id):03d}", os.path.basename(folder))
        spec = _spec("nnunet", dataset_id, name, seed, cfg, channels, n_train=n_train, n_test=n_test)
        layouts.append(_Layout(folder, "nnunet", cfg.compression_level, cfg.file_dtype))
        specs.append(spec)
    if nndet_root is not None:
        task = f"Task{int(dataset_id):03d}_{name}"
        folder = os.path.join(os.fspath(nndet_root), task)
        _check_id_free(os.fspath(nndet_root), f"Task{int(dataset_id):03d}", task)
        spec = _spec("nndet", dataset_id, name, seed, cfg, channels, n_train=n_train, n_test=n_test)
        layouts.append(_Layout(folder, "nndet", cfg.compression_level, cfg.file_dtype))
        specs.append(spec)
    todo = []
    for lay, spec in zip(layouts, specs):
        done[lay.kind] = lay.folder
        if not _prepare_folder(lay.folder, spec, overwrite):
            todo.append((lay, spec))
    if todo:
        _generate([lay for lay, _ in todo], _labelled_jobs(n_train, n_test), seed, cfg, channels, progress,
                  f"Dataset{int(dataset_id):03d}_{name}")
        for lay, spec in todo:
            if lay.kind == "nnunet":
                write_json(_nnunet_dataset_json(cfg, channels, n_train, name), os.path.join(lay.folder, "dataset.json"))
            else:
                task = os.path.basename(lay.folder)
                write_json(_nndet_dataset_json(task, name, channels), os.path.join(lay.folder, "dataset.json"))
            _finish_folder(lay.folder, spec)
    return done


def write_nnunet_dataset(out_raw: str, dataset_id: int, name: str, n_train: int, n_test: int, seed: int,
                         config: Optional[SynthConfig] = None, channels: int = 1, lung_label: bool = False,
                         *, overwrite: bool = False, progress: bool = False) -> str:
    """Write a labelled nnU-Net v2 raw dataset of synthetic cases.

    Layout: ``out_raw/DatasetXXX_name/{imagesTr, labelsTr, imagesTs, labelsTs, dataset.json}``; images
    ``{case}_{channel:04d}.nii.gz``, semantic labels ``{case}.nii.gz`` (uint8: 0 background, 1 lesion,
    2 lung if ``lung_label``). Training cases are ``train_0000..``, test cases ``test_0000..``.

    Args:
        out_raw: the ``nnUNet_raw`` folder.
        dataset_id / name: nnU-Net dataset id (1..999) and name (letters, digits, ``_``, ``-``).
        n_train / n_test: number of labelled training and test cases.
        seed: dataset seed; case k of a split is the same for any n_train/n_test.
        config: generator knobs (default ``SynthConfig()``); ``lung_label=True`` switches on the lung label.
        channels: 1 (``{"0": "CT"}``) or 2 (``{"0": "CT", "1": "CT2"}``).
        overwrite: replace an existing folder generated with other settings (otherwise an error).
        progress: show a tqdm progress bar.

    Returns:
        The dataset folder. An existing folder generated with identical settings is reused as is.
    """
    cfg = _resolve_cfg(config, lung_label)
    return _labelled(out_raw, None, dataset_id, name, n_train, n_test, seed, cfg, channels, overwrite,
                     progress)["nnunet"]


def write_nndet_dataset(out_root: str, task_id: int, name: str, n_train: int, n_test: int, seed: int,
                        config: Optional[SynthConfig] = None, channels: int = 1, *, overwrite: bool = False,
                        progress: bool = False) -> str:
    """Write the same labelled cases (same ids and images as :func:`write_nnunet_dataset`) for nnDetection.

    Layout: ``out_root/TaskXXX_name/raw_splitted/{imagesTr, labelsTr, imagesTs, labelsTs}`` with instance
    maps ``{case}.nii.gz`` (int16, 0 background, 1..N consecutive) and ``{case}.json`` =
    ``{"instances": {"1": 0, ...}}`` (class 0 = lesion), plus ``TaskXXX_name/dataset.json`` (task, name,
    dim 3, labels ``{"0": "lesion"}``, modalities, test_labels).

    Returns:
        The task folder ``out_root/TaskXXX_name``.
    """
    cfg = _resolve_cfg(config, False)
    return _labelled(None, out_root, task_id, name, n_train, n_test, seed, cfg, channels, overwrite,
                     progress)["nndet"]


def write_unlabeled_pool(out_raw: str, dataset_id: int, name: str, n_cases: int, seed: int,
                         config: Optional[SynthConfig] = None, channels: int = 1, *, overwrite: bool = False,
                         progress: bool = False) -> str:
    """Write an unlabelled pretraining pool as an nnU-Net raw folder with ``imagesTr`` only (no labels).

    ``dataset.json`` has ``channel_names``, ``labels = {"background": 0}``, ``numTraining``, ``file_ending``
    and ``"nnpre_unlabeled": true``. Cases ``pool_0000..`` come from their own seed stream, so they never
    repeat a labelled case of the same seed. ``channels=2`` adds the second contrast (channel "CT2").

    Returns:
        The dataset folder.
    """
    _check_id(dataset_id)
    _check_name(name)
    _check_counts(n_cases=n_cases)
    if channels not in (1, 2):
        fail(f"channels must be 1 or 2, got {channels}")
    cfg = config or SynthConfig()
    folder = os.path.join(os.fspath(out_raw), f"Dataset{int(dataset_id):03d}_{name}")
    _check_id_free(os.fspath(out_raw), f"Dataset{int(dataset_id):03d}", os.path.basename(folder))
    spec = _spec("pool", dataset_id, name, seed, cfg, channels, n_cases=n_cases)
    if _prepare_folder(folder, spec, overwrite):
        return folder
    lay = _Layout(folder, "pool", cfg.compression_level, cfg.file_dtype)
    jobs = [("Tr", cid, STREAM_POOL, k) for k, cid in enumerate(_case_ids("pool", n_cases))]
    _generate([lay], jobs, seed, cfg, channels, progress, f"Dataset{int(dataset_id):03d}_{name}")
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    write_json({"name": name, "description": "nnpre synthetic unlabelled pretraining pool (nnpre.synthetic)",
                "channel_names": _channel_names(channels), "labels": {"background": 0},
                "numTraining": int(n_cases), "file_ending": FILE_ENDING, "nnpre_unlabeled": True},
               os.path.join(folder, "dataset.json"))
    _finish_folder(folder, spec)
    return folder


def make_study(root: str, seed: int = 0, n_train: int = 10, n_test: int = 6, n_pool: int = 16,
               labelled_id: int = 501, pool_id: int = 502, pool_channels: int = 1,
               config: Optional[SynthConfig] = None, *, labelled_name: str = "SynthLesions",
               pool_name: str = "SynthPool", overwrite: bool = False, progress: bool = False) -> dict:
    """Write the demo study: labelled nnU-Net dataset, its nnDetection copy and the unlabelled pool.

    Each labelled case is synthesised once and written in both formats.

    Returns:
        ``{"root", "nnUNet_raw", "nndet_raw", "labelled", "nndet", "pool" (None if n_pool == 0),
        "labelled_id", "pool_id", "seed"}``.
    """
    cfg = config or SynthConfig()
    if n_pool > 0 and pool_id == labelled_id:
        fail(f"pool_id and labelled_id must differ (both {pool_id})")
    raw = os.path.join(os.fspath(root), "nnUNet_raw")
    det = os.path.join(os.fspath(root), "nndet_raw")
    done = _labelled(raw, det, labelled_id, labelled_name, n_train, n_test, seed, cfg, 1, overwrite, progress)
    pool = None
    if n_pool > 0:
        pool = write_unlabeled_pool(raw, pool_id, pool_name, n_pool, seed, cfg, pool_channels,
                                    overwrite=overwrite, progress=progress)
    return {"root": os.fspath(root), "nnUNet_raw": raw, "nndet_raw": det, "labelled": done["nnunet"],
            "nndet": done["nndet"], "pool": pool, "labelled_id": int(labelled_id), "pool_id": int(pool_id),
            "seed": int(seed)}
