"""nnDetection v001 training recipe: constants, warm-up/poly/SWA learning rates by hand, the stage schedule that
reproduces them, optimizer groups (no weight decay on norms), fitting to other run lengths, preset overrides."""
import pytest
import torch
from torch import nn

from nnpre.errors import NnPreError
from nnpre.presets import get_preset
from nnpre_detection.recipe import NNDET_V001, DetectionRecipe, recipe_for_preset
from nnpre_trainers.finetune_schedule import parameter_groups
from nnpre_trainers.stage_controller import StageController


def test_v001_constants():
    r = NNDET_V001
    assert (r.optimizer, r.initial_lr, r.momentum, r.nesterov, r.weight_decay) == ("sgd", 1e-2, 0.9, True, 3e-5)
    assert (r.warm_iterations, r.warm_lr, r.poly_gamma, r.swa_epochs) == (4000, 1e-6, 0.9, 10)
    assert (r.num_epochs, r.iterations_per_epoch, r.oversample_foreground_percent) == (50, 2500, 0.5)
    assert r.val_iterations_per_epoch == 100 and r.no_weight_decay_on_norm
    assert r.monitor_key == "mAP_IoU_0.10_0.50_0.05_MaxDet_100" and r.monitor_mode == "max"
    assert r.grad_clip is None and r.total_epochs == 60


def test_lr_schedule_by_hand():
    r = DetectionRecipe(initial_lr=0.01, warm_iterations=4, warm_lr=0.0, num_epochs=2, iterations_per_epoch=7,
                        swa_epochs=1, poly_gamma=1.0)
    # warm-up: step i uses (i + 1) / 4 of the lr
    assert [r.lr_at(i) for i in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    # poly over T - W = 10 steps with gamma 1: 1 - (i + 1 - 4) / 10
    assert r.lr_at(4) == pytest.approx(0.01 * 0.9) and r.lr_at(12) == pytest.approx(0.01 * 0.1)
    assert r.lr_at(13) == pytest.approx(0.01 * 0.1)  # clamped at the last poly step
    # SWA epoch: linear cycle from lr / 1000 rising towards lr / 10 (nnDetection's cyclic_linear_lr)
    swa = [r.lr_at(14 + c) for c in range(7)]
    assert swa[0] == pytest.approx(1e-5) and swa == sorted(swa) and swa[-1] < 1e-3
    assert r.lr_at(14 + 7) == pytest.approx(1e-5)  # next cycle restarts
    assert r.swa_update_epochs() == [2]


@pytest.mark.parametrize("recipe", [
    DetectionRecipe(warm_iterations=5, num_epochs=3, iterations_per_epoch=4, swa_epochs=2),
    DetectionRecipe(warm_iterations=0, num_epochs=2, iterations_per_epoch=3, swa_epochs=0, poly_gamma=1.0),
    DetectionRecipe(warm_iterations=11, num_epochs=3, iterations_per_epoch=4, swa_epochs=1)])
def test_schedule_reproduces_lr_at_everywhere(recipe):
    """The stage schedule (generic LR rules) gives nnDetection's scheduler value at every iteration."""
    sched = recipe.schedule()
    assert [sched.lr_at(i) for i in range(recipe.total_iterations)] == pytest.approx(
        [recipe.lr_at(i) for i in range(recipe.total_iterations)], rel=1e-12)
    names = [s.name for s in sched.stages]
    assert names == (["main", "swa"] if recipe.swa_epochs else ["main"])
    assert sched.total_iterations == recipe.total_iterations and sched.grad_clip is None
    if recipe.swa_epochs:
        swa = sched.stages[-1]
        assert swa.keep_optimizer and swa.average_every == recipe.iterations_per_epoch
        assert sched.boundaries()[-1] == (recipe.main_iterations, recipe.total_iterations)


def test_v001_schedule_at_chosen_iterations():
    sched = NNDET_V001.schedule()
    for i in (0, 1, 1999, 3999, 4000, 4001, 60000, 124998, 124999, 125000, 126249, 127499, 127500, 149999):
        assert sched.lr_at(i) == pytest.approx(NNDET_V001.lr_at(i), rel=1e-12), i
    assert sched.lr_at(0) == pytest.approx(1e-6 + (1e-2 - 1e-6) / 4000)
    assert sched.lr_at(3999) == pytest.approx(1e-2)
    assert sched.lr_at(125000) == pytest.approx(1e-5) and sched.lr_at(127500) == pytest.approx(1e-5)


def test_optimizer_groups_no_weight_decay_on_norm_layers():
    net = nn.Module()
    net.encoder = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True))
    net.decoder = nn.Sequential(nn.GroupNorm(2, 4), nn.Conv3d(4, 1, 1))
    c = StageController(NNDET_V001.schedule(), lambda: parameter_groups(net, False), log=lambda s: None,
                        network=lambda: net)
    opt = c.start(0)
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 2
    decayed, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert decayed == {id(p) for m in (net.encoder[0], net.decoder[1]) for p in m.parameters()}  # conv w + b
    assert no_decay == {id(p) for m in (net.encoder[1], net.decoder[0]) for p in m.parameters()}
    assert [g["weight_decay"] for g in opt.param_groups] == [3e-5, 0.0]
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    assert all(g["lr"] == pytest.approx(NNDET_V001.lr_at(0)) for g in opt.param_groups)
    tiny = recipe_for_preset(get_preset("cpu-tiny")).schedule()
    opt = StageController(tiny, lambda: parameter_groups(net, False), log=lambda s: None, network=lambda: net).start(0)
    assert isinstance(opt, torch.optim.AdamW) and [g["weight_decay"] for g in opt.param_groups] == [3e-5, 0.0]


def test_fitted_to_other_run_lengths():
    assert NNDET_V001.fitted(60, 2500) is NNDET_V001
    r = NNDET_V001.fitted(6, 10)  # SWA keeps 10 / 60 of the epochs, the warm-up 3.2 % of the main phase
    assert (r.num_epochs, r.swa_epochs, r.iterations_per_epoch, r.warm_iterations) == (5, 1, 10, 2)
    r = NNDET_V001.fitted(60, 250)
    assert (r.num_epochs, r.swa_epochs, r.warm_iterations) == (50, 10, 400)
    assert NNDET_V001.fitted(2, 5).swa_epochs == 1 and NNDET_V001.fitted(1, 5).swa_epochs == 0
    assert NNDET_V001.replace(swa_epochs=0).fitted(7, 3).swa_epochs == 0
    with pytest.raises(NnPreError, match=">= 1 epoch"):
        NNDET_V001.fitted(0, 5)


def test_pretrained_schedule_keeps_the_dkfz_decoder_stage():
    r = NNDET_V001.replace(num_epochs=10, iterations_per_epoch=10, swa_epochs=2, warm_iterations=3)
    sched = r.schedule(pretrained=True)
    assert [s.name for s in sched.stages] == ["decoder_warmup", "whole_network", "swa"]
    assert sched.boundaries() == [(0, 5), (5, 100), (100, 120)]  # 5 % of the 100 main iterations
    assert "encoder" not in sched.stages[0].trains and "encoder" in sched.stages[1].trains
    assert sched.lr_at(0) == pytest.approx(1e-6 + (1e-2 - 1e-6) / 3)  # decoder warm-up over half its stage
    assert sched.lr_at(5) == pytest.approx(1e-6 + (1e-2 - 1e-6) / 5)  # whole network re-warmed over 5 %
    assert sched.lr_at(9) == pytest.approx(1e-2)
    assert [sched.lr_at(i) for i in range(100, 120)] == pytest.approx([r.lr_at(i) for i in range(100, 120)])
    # too short for a decoder stage: the scratch structure
    assert [s.name for s in NNDET_V001.replace(num_epochs=1, iterations_per_epoch=20).schedule(True).stages] == \
        ["main", "swa"]


def test_preset_overrides_and_bad_fields():
    assert recipe_for_preset(get_preset("gpu")) == NNDET_V001
    tiny = recipe_for_preset(get_preset("cpu-tiny"))
    assert (tiny.optimizer, tiny.initial_lr, tiny.swa_epochs, tiny.warm_iterations, tiny.grad_clip) == \
        ("adamw", 3e-3, 0, 0, 12.0)
    assert tiny.oversample_foreground_percent == 0.5 and tiny.momentum == NNDET_V001.momentum
    sched = tiny.schedule()
    assert [s.name for s in sched.stages] == ["main"] and sched.grad_clip == 12.0
    with pytest.raises(NnPreError, match="unknown detection recipe"):
        NNDET_V001.replace(lr=1)
    with pytest.raises(NnPreError, match="optimizer"):
        DetectionRecipe(optimizer="adam")
    with pytest.raises(NnPreError, match="oversample"):
        DetectionRecipe(oversample_foreground_percent=1.5)


def test_preset_detector_overrides():
    from nnpre_detection.recipe import preset_detector_overrides
    from nnpre_detection.retina_unet import RetinaUNetConfig

    assert preset_detector_overrides("gpu", 6) == {}
    over = preset_detector_overrides("cpu-tiny", 4)
    assert over == {"head_channels": 32}  # nnDetection's detection levels (see the docstring's measurement)
    RetinaUNetConfig().with_overrides(**over)  # valid detector options


def test_oversampling_0_5_and_0_33_force_the_same_patches_at_batch_2():
    """Why cpu-tiny (batch 2) keeps nnDetection's 0.5: nnU-Net's loader forces foreground in the same sample."""
    from types import SimpleNamespace

    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    def forced(batch, p):
        dl = SimpleNamespace(batch_size=batch, oversample_foreground_percent=p)
        return [nnUNetDataLoader._oversample_last_XX_percent(dl, j) for j in range(batch)]

    assert forced(2, 0.5) == forced(2, 0.33) == [False, True]
    assert forced(4, 0.5) == [False, False, True, True] and forced(4, 0.33) == [False, False, False, True]
