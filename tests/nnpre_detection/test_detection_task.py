"""Detection task: strides for anchor planning come from the plans (no probe network), boxes from seg patches."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nnpre.architecture import unet_arch_kwargs
from nnpre_detection.retina_unet import build_retina_unet
from nnpre_detection.task import DetectionTask, detection_level_strides
from nnpre_trainers.tasks import TaskContext

RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
REQ = ["conv_op", "norm_op", "dropout_op", "nonlin"]


@pytest.mark.parametrize("n_stages,strides", [(4, [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
                                              (5, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]])])
def test_strides_from_plans_match_the_built_detector(n_stages, strides):
    kw = unet_arch_kwargs([4 * 2 ** i for i in range(n_stages)], [[3, 3, 3]] * n_stages, strides, [1] * n_stages,
                          [1] * (n_stages - 1))
    net = build_retina_unet(RESENC, kw, 1, 1, arch_kwargs_req_import=REQ, head_channels=8)
    got, levels = detection_level_strides(kw)
    assert got == [tuple(s) for s in net.encoder.strides] and levels == net.decoder_levels


def test_anchors_planned_from_training_cases():
    kw = unet_arch_kwargs([4, 8, 16, 32], [[3, 3, 3]] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3, [1] * 4, [1] * 3)
    segs = []
    rng = np.random.default_rng(0)
    for i in range(4):
        s = np.zeros((1, 32, 32, 32), dtype=np.int64)
        a = rng.integers(2, 10, 3)
        size = rng.integers(4, 9, 3)
        s[0, a[0]:a[0] + size[0], a[1]:a[1] + size[1], a[2]:a[2] + size[2]] = 1
        segs.append((f"c{i}", s))
    ctx = TaskContext(SimpleNamespace(plans={"nnpre": {"preset": "cpu-tiny"}}),
                      SimpleNamespace(network_arch_class_name=RESENC, network_arch_init_kwargs=kw,
                                      network_arch_init_kwargs_req_import=REQ),
                      SimpleNamespace(foreground_labels=[1]), {}, 1, lambda: iter(segs), lambda s: None)
    task = DetectionTask()
    torch.manual_seed(0)
    net = task.build_network(ctx)
    assert task.anchor_sizes is not None and 0 < task.anchor_sizes.num_boxes <= 4  # percentile-filtered
    assert len(task.anchor_sizes.level_factors) == len(net.decoder_levels)
    assert net.config.head_channels == 32  # the cpu-tiny preset's detector head width
    data = torch.randn(1, 1, 32, 32, 32)
    inputs = task.prepare_batch({"data": data, "target": torch.as_tensor(segs[0][1][None]).float()},
                                torch.device("cpu"))
    losses = task.compute_losses(net, inputs)
    assert "loss" in losses and len(losses) > 1 and torch.isfinite(losses["loss"])


def test_training_recipe_as_task_data():
    """The task gives the trainer nnDetection's length, schedule and oversampling, fitted to the run's length;
    cpu-tiny's overrides come from its preset; an explicit recipe wins."""
    from nnpre.presets import get_preset
    from nnpre_detection.recipe import NNDET_V001, recipe_for_preset

    gpu, tiny = get_preset("gpu"), get_preset("cpu-tiny")
    task = DetectionTask()
    assert task.training_length(gpu) == (60, 2500, 100, 5) and task.training_length(tiny) == (4, 10, 2, 1)
    run = SimpleNamespace(preset=gpu, num_epochs=60, num_iterations_per_epoch=2500, from_scratch=True)
    assert task.default_schedule(run) == NNDET_V001.schedule() and task.foreground_oversampling(run) == 0.5
    run.from_scratch = False
    assert [s.name for s in task.default_schedule(run).stages] == ["decoder_warmup", "whole_network", "swa"]
    run = SimpleNamespace(preset=tiny, num_epochs=12, num_iterations_per_epoch=50, from_scratch=True)
    sched = task.default_schedule(run)
    assert sched == recipe_for_preset(tiny).fitted(12, 50).schedule() and sched.total_iterations == 600
    assert sched.optimizer == "adamw" and sched.grad_clip == 12.0 and [s.name for s in sched.stages] == ["main"]
    own = NNDET_V001.replace(num_epochs=2, iterations_per_epoch=3, swa_epochs=1, oversample_foreground_percent=0.3)
    task = DetectionTask(training_recipe=own)
    assert task.training_length(tiny)[:3] == (3, 3, 100)
    assert task.foreground_oversampling(SimpleNamespace(preset=tiny, num_epochs=3, num_iterations_per_epoch=3)) == 0.3
