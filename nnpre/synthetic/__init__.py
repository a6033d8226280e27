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
(96 mm cube by default), so shapes differ between cases and resampling is always exercised.

Modules: :mod:`~nnpre.synthetic.config` (knobs, difficulty levels), :mod:`~nnpre.synthetic.calibration`
(measured difficulty as data), :mod:`~nnpre.synthetic.geometry` (grid, smooth fields),
:mod:`~nnpre.synthetic.scene` (sampling anatomy and lesions in mm), :mod:`~nnpre.synthetic.render` (sampling
on the voxel grid, scanner effects), :mod:`~nnpre.synthetic.writers` (nnU-Net / nnDetection / pool files),
:mod:`~nnpre.synthetic.study_folders` (folder reuse), :mod:`~nnpre.synthetic.datasets` (seeds, whole datasets).

Determinism: everything in a case is drawn from the single ``np.random.Generator`` passed to
:func:`synthesize_case`; the dataset writers derive one generator per case (:func:`case_rng`).
Axis conventions: arrays are numpy/SimpleITK order (Z, Y, X); spacing, origin and physical points are
(x, y, z) in mm as SimpleITK reports them.
"""
from nnpre.synthetic.calibration import SYNTH_CALIBRATION
from nnpre.synthetic.config import SYNTH_PRESETS, SynthConfig, get_synth_config
from nnpre.synthetic.datasets import (
    STREAM_POOL,
    STREAM_TEST,
    STREAM_TRAIN,
    case_rng,
    make_study,
    write_nndet_dataset,
    write_nnunet_dataset,
    write_unlabeled_pool,
)
from nnpre.synthetic.render import SyntheticCase, synthesize_case
from nnpre.synthetic.study_folders import GENERATOR_VERSION, MARKER_FILE
from nnpre.synthetic.writers import FILE_ENDING, case_to_sitk

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
    "MARKER_FILE",
    "FILE_ENDING",
    "STREAM_TRAIN",
    "STREAM_TEST",
    "STREAM_POOL",
]
