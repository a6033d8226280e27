"""Training tasks built from a context alone (no trainer): networks, batches, losses; the fine-tuning registry."""
import os
from types import SimpleNamespace

import pytest
import torch

from nnpre.architecture import unet_arch_kwargs
from nnpre.errors import NnPreError
from nnpre_trainers.tasks import TaskContext, get_task, list_tasks

RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
REQ = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def _ctx(channels=1, labels=(1,), n_stages=3):
    kw = unet_arch_kwargs([4 * 2 ** i for i in range(n_stages)], [[3, 3, 3]] * n_stages,
                          [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1), [1] * n_stages, [1] * (n_stages - 1))
    cm = SimpleNamespace(network_arch_class_name=RESENC, network_arch_init_kwargs=kw,
                         network_arch_init_kwargs_req_import=REQ)
    lm = SimpleNamespace(num_segmentation_heads=len(labels) + 1, foreground_labels=list(labels))
    pm = SimpleNamespace(plans={"nnpre": {"preset": "cpu-tiny"}})
    return TaskContext(pm, cm, lm, {"channel_names": {str(c): "CT" for c in range(channels)}}, channels,
                       lambda: iter(()), lambda s: None)


def test_registry_lists_and_rejects():
    assert {"segmentation", "detection"} <= set(list_tasks())
    with pytest.raises(NnPreError, match="unknown training task 'simclr'"):
        get_task("simclr")


def test_segmentation_task_network_and_loss():
    torch.manual_seed(0)
    task = get_task("segmentation")
    net = task.build_network(_ctx(channels=2, labels=(1, 2)))
    assert net.decoder.deep_supervision is False
    out = net(torch.randn(1, 2, 16, 16, 16))
    assert out.shape == (1, 3, 16, 16, 16)


@pytest.mark.parametrize("name", ["mae", "model_genesis", "diffusion"])
def test_pretext_task_network_batch_and_loss(name):
    from nnpre_trainers.pretext import PretextSample
    from nnpre_trainers.tasks.pretext import PretextTrainingTask

    torch.manual_seed(0)
    task = PretextTrainingTask(name)
    net = task.build_network(_ctx())
    x = torch.randn(2, 1, 16, 16, 16)
    context = {"patch_bbox": torch.tensor([[[0, 16]] * 3] * 2), "volume_shape": torch.tensor([[16] * 3] * 2)}
    s = task.pretext.corrupt(x, torch.Generator().manual_seed(0), context)
    batch = {"data": s.input, "target": s.target, "loss_mask": s.loss_mask, "extras": s.extras}
    inputs = task.prepare_batch(batch, torch.device("cpu"))
    assert isinstance(inputs, PretextSample)
    loss = task.compute_losses(net, inputs)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if n.startswith("encoder."))
    assert task.recipe == "pretrain" and not task.needs_labels and task.name == f"pretext:{name}"


def test_pretext_loss_plot_reads_the_logger_through_nnunets_public_api(tmp_path):
    """progress_pretrain.png comes from nnU-Net's MetaLogger.get_value (no LocalLogger internals): a logger that
    offers only get_value (forwarding to a real MetaLogger) suffices."""
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    from nnpre_trainers.tasks.pretext import PretextTrainingTask

    logger = MetaLogger(str(tmp_path), resume=False)
    for e, (tr, va) in enumerate([(1.0, 1.2), (0.8, 0.9), (0.7, 0.75)]):
        logger.log("train_losses", tr, e)
        logger.log("val_losses", va, e)
    asked = []

    class OnlyGetValue:
        def get_value(self, key, step):
            asked.append((key, step))
            return logger.get_value(key, step)

    task = PretextTrainingTask("mae")
    task._plot_losses(SimpleNamespace(logger=OnlyGetValue(), output_folder=str(tmp_path)))
    assert sorted(asked) == [("train_losses", None), ("val_losses", None)]
    assert os.path.getsize(tmp_path / "progress_pretrain.png") > 1000
