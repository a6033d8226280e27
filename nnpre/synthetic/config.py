"""Generator knobs (:class:`SynthConfig`) and the named difficulty levels (:data:`SYNTH_PRESETS`).

Why the defaults are what they are
----------------------------------
A stock nnU-Net reaches Dice ~0.95 within a few hundred iterations on bright spheres in noise, which leaves no
room for pretraining to help. The ``default`` level makes the task hard in the ways real lesion segmentation is:

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
  20 HU, both smooth over the field of view; soft-tissue baseline 30..55 HU. No global HU window separates
  lesions from the rest (``tests/nnpre/synthetic/test_render.py`` checks that the best label-aware window
  stays below Dice 0.3), so a model must learn local features, which pretraining on the unlabelled pool
  can supply.
* **Empty cases.** The lesion count is uniform in 0..6, so about 1 case in 7 has no lesion.

The test Dice each level gives, and the command that measures it, are data in
:mod:`nnpre.synthetic.calibration`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

from nnpre.errors import fail
from nnpre.synthetic.geometry import Range

__all__ = ["Range", "SynthConfig", "SYNTH_PRESETS", "get_synth_config"]


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator (all physical sizes in mm, intensities in HU).

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


_MEDIUM = dict(lesion_contrast_hu=(25.0, 90.0), noise_std_hu=(8.0, 22.0), enhancing_prob=0.1,
               bias_mult=(0.0, 0.02), bias_add_hu=(0.0, 10.0), n_vessels=(2, 5))

#: Named difficulty levels. "default" is the calibrated task described above; "medium" halves the
#: confounders; "cpu" is "medium" with lesions twice as large (radius 6..16 mm, 0..4 per case) so that at the
#: 2 mm grid of the ``cpu-tiny`` preset they span as many voxels as default lesions do at ~1 mm (the CPU
#: demo's task); "easy" is the bright-spheres sanity task (high-contrast soft-tissue lesions, no vessels,
#: little noise, no bias). Their measured test Dice: :mod:`nnpre.synthetic.calibration`.
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


def get_synth_config(name: str = "default", **overrides) -> SynthConfig:
    """The named difficulty level from :data:`SYNTH_PRESETS` with ``overrides`` applied (e.g. ``fov_mm=64``)."""
    if name not in SYNTH_PRESETS:
        fail(f"unknown synthetic difficulty {name!r}; choose one of {sorted(SYNTH_PRESETS)}")
    try:
        return dataclasses.replace(SYNTH_PRESETS[name], **overrides)
    except TypeError as e:
        fail(f"bad SynthConfig override: {e}")

