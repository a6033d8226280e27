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
