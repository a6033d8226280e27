"""nnDetection v001 training recipe: constants, warm-up/poly/SWA learning rates by hand, no weight decay on norms,
SWA averaging."""
import pytest
import torch
from torch import nn

from nnpre.errors import NnPreError
from nnpre_detection.recipe import NNDET_V001, DetectionRecipe, SWAAverager


def test_v001_constants():
    r = NNDET_V001
    assert (r.optimizer, r.initial_lr, r.momentum, r.nesterov, r.weight_decay) == ("sgd", 1e-2, 0.9, True, 3e-5)
    assert (r.warm_iterations, r.warm_lr, r.poly_gamma, r.swa_epochs) == (4000, 1e-6, 0.9, 10)
    assert (r.num_epochs, r.iterations_per_epoch, r.oversample_foreground_percent) == (50, 2500, 0.5)
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


def test_no_weight_decay_on_norm_layers_and_optimizer():
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.GroupNorm(2, 4), nn.Conv3d(4, 1, 1))
    groups = NNDET_V001.param_groups(net)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(p) for i in (0, 3) for p in net[i].parameters()}  # conv weights and biases
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 4
    opt = NNDET_V001.make_optimizer(net)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["lr"] == pytest.approx(1e-6 + (1e-2 - 1e-6) / 4000)
    assert NNDET_V001.set_lr(opt, 10 ** 6) == pytest.approx(NNDET_V001.lr_at(10 ** 6))
    assert isinstance(NNDET_V001.replace(optimizer="adamw").make_optimizer(net), torch.optim.AdamW)


def test_monitor_and_bad_fields():
    assert NNDET_V001.is_better(0.3, None) and NNDET_V001.is_better(0.3, 0.2) and not NNDET_V001.is_better(0.1, 0.2)
    assert not NNDET_V001.is_better(float("nan"), 0.2) and NNDET_V001.is_better(0.1, float("nan"))
    with pytest.raises(NnPreError, match="unknown detection recipe"):
        NNDET_V001.replace(lr=1)
    with pytest.raises(NnPreError, match="optimizer"):
        DetectionRecipe(optimizer="adam")


def test_swa_average_of_snapshots():
    net = nn.Linear(2, 1)
    avg = SWAAverager(net)
    with pytest.raises(NnPreError, match="never called"):
        avg.copy_to(net)
    snaps = []
    for v in (1.0, 2.0, 6.0):
        with torch.no_grad():
            net.weight.fill_(v)
            net.bias.fill_(-v)
        avg.update(net)
        snaps.append(v)
    avg.copy_to(net)
    assert torch.allclose(net.weight, torch.full((1, 2), 3.0)) and torch.allclose(net.bias, torch.tensor([-3.0]))


def test_preset_detector_overrides():
    from nnpre_detection.recipe import preset_detector_overrides
    from nnpre_detection.retina_unet import RetinaUNetConfig

    assert preset_detector_overrides("gpu", 6) == {}
    over = preset_detector_overrides("cpu-tiny", 4)
    assert over == {"head_channels": 32}  # nnDetection's detection levels (see the docstring's measurement)
    RetinaUNetConfig().with_overrides(**over)  # valid detector options
