"""Tests for the generator's knobs and difficulty levels."""
import numpy as np
import pytest

from nnpre.errors import NnPreError
from nnpre.synthetic import STREAM_TRAIN, SYNTH_PRESETS, SynthConfig, case_rng, get_synth_config, synthesize_case


def test_cpu_level_is_medium_with_lesions_scaled_to_the_2mm_grid():
    medium, cpu = get_synth_config("medium"), get_synth_config("cpu")
    changed = {k for k, v in medium.to_dict().items() if cpu.to_dict()[k] != v}
    assert changed == {"lesion_radius_mm", "n_lesions"}
    radii = [les["radius_mm"] for k in range(6)
             for les in synthesize_case(case_rng(0, STREAM_TRAIN, k), cpu).info["lesions"]]
    assert radii and min(radii) >= 6.0 and max(radii) <= 16.0
    # design intent: the median radius (log-uniform) in 2 mm voxels is within 20 % of the default's in 1 mm voxels
    vox_cpu = np.sqrt(np.prod(cpu.lesion_radius_mm)) / 2.0
    vox_default = np.sqrt(np.prod(get_synth_config("default").lesion_radius_mm)) / 1.0
    assert abs(vox_cpu / vox_default - 1.0) < 0.2


def test_overrides_apply_and_bad_values_fail_in_one_line():
    cfg = get_synth_config("easy", fov_mm=(64, 48, 32))
    assert cfg.fov_xyz == (64.0, 48.0, 32.0) and cfg.lesion_contrast_hu == SYNTH_PRESETS["easy"].lesion_contrast_hu
    assert SYNTH_PRESETS["easy"].fov_mm == 96.0  # the preset itself is untouched
    for bad, match in ((dict(fov_mm=0.0), "fov_mm"), (dict(noise_std_hu=(5.0, 1.0)), "noise_std_hu"),
                       (dict(lesion_site_probs=(1.0, -1.0, 0.0)), "lesion_site_probs"),
                       (dict(file_dtype="uint8"), "file_dtype")):
        with pytest.raises(NnPreError, match=match) as e:
            SynthConfig(**bad)
        assert "\n" not in str(e.value)
    with pytest.raises(NnPreError, match="override"):
        get_synth_config("default", no_such_knob=1)


def test_to_dict_is_json_and_round_trips():
    cfg = get_synth_config("cpu")
    d = cfg.to_dict()
    assert isinstance(d["lesion_radius_mm"], list)
    again = SynthConfig(**{k: tuple(v) if isinstance(v, list) and k != "body_semi_axes_frac"
                           else v for k, v in d.items()})
    assert again.to_dict() == d
    assert np.isclose(again.lesion_radius_mm[0], 6.0)
