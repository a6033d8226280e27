"""Pretext registry: lookup/config errors, a smoke step for every task, and short learning runs."""
import dataclasses

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from torch import nn

from nnpre.errors import NnPreError
from nnpre_trainers.pretext import (
    PretextSample,
    PretextTask,
    attach_conditioning,
    default_config,
    get_pretext,
    list_pretexts,
    register_pretext,
)
from nnpre_trainers.pretext import registry as registry_module


def tiny_resenc(cin: int, cout: int) -> nn.Module:
    """4 stages, features 4..32: the smallest ResEnc U-Net of the nnU-Net family."""
    torch.manual_seed(0)
    return ResidualEncoderUNet(cin, 4, [4, 8, 16, 32], nn.Conv3d, 3, [1, 2, 2, 2], [1, 1, 1, 1], cout, [1, 1, 1],
                               conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                               nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def blob_volumes(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 1, size³) z-scored volumes of 4 Gaussian blobs on a flat background (skewed intensities)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    out = torch.zeros(n, 1, size, size, size)
    for i in range(n):
        for _ in range(4):
            centre = torch.rand(3, generator=g) * size
            sigma = 1.5 + 2 * torch.rand(1, generator=g)
            out[i, 0] += torch.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * sigma ** 2))
    return (out - out.mean(dim=(2, 3, 4), keepdim=True)) / out.std(dim=(2, 3, 4), keepdim=True)


# -- registry -----------------------------------------------------------------------------------------------
def test_registered_tasks_and_default_configs():
    assert {"mae", "model_genesis", "diffusion"} <= set(list_pretexts())
    assert list_pretexts() == sorted(list_pretexts())
    mae = default_config("mae")
    assert mae == {"mask_ratio": 0.75, "block_size": 16, "fill": "zero", "augmentation": "nnssl"}  # nnssl MAE
    mg = default_config("model_genesis")
    assert (mg["flip_rate"], mg["local_rate"], mg["nonlinear_rate"], mg["paint_rate"], mg["inpaint_rate"],
            mg["num_windows"]) == (0.4, 0.5, 0.9, 0.9, 0.2, 10_000)  # ModelsGenesis pytorch/config.py
    diff = default_config("diffusion")
    assert (diff["num_timesteps"], diff["schedule"], diff["feature_timesteps"]) == (1000, "linear", (10, 30, 60))
    for name in list_pretexts():
        task = get_pretext(name)
        assert task.name == name and isinstance(task, PretextTask)
        assert dataclasses.asdict(task.config) == default_config(name)
        for v in default_config(name).values():  # plain values: they go into checkpoints and JSON
            assert v is None or isinstance(v, (int, float, str, bool, tuple))


def test_overrides_and_errors():
    assert get_pretext("mae", mask_ratio=0.6).config.mask_ratio == 0.6
    assert get_pretext("diffusion", feature_timesteps=[5, 7]).config.feature_timesteps == (5, 7)
    with pytest.raises(NnPreError, match="known tasks: diffusion, mae, model_genesis, s3d, voco"):
        get_pretext("simclr")
    with pytest.raises(NnPreError, match="unknown pretext task"):
        default_config("simclr")
    with pytest.raises(NnPreError, match=r"unknown option\(s\) \['ratio'\].*valid options"):
        get_pretext("mae", ratio=0.5)


def test_register_decorator_rules():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        scale: float = 2.0

    try:
        @register_pretext("_test_scale")
        class ScaleTask(PretextTask):
            config_class = Cfg

            def corrupt(self, image, generator, context=None):
                return PretextSample(input=image * self.config.scale, target=image)

        assert ScaleTask.name == "_test_scale" and "_test_scale" in list_pretexts()
        assert get_pretext("_test_scale", scale=3.0).config.scale == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register_pretext("_test_scale")(type("Other", (ScaleTask,), {}))
        with pytest.raises(TypeError):
            register_pretext("_not_a_task")(object)
    finally:
        registry_module._REGISTRY.pop("_test_scale", None)
    assert "_test_scale" not in list_pretexts()


# -- every task: one full step ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_pretexts())
def test_smoke_step_on_tiny_resenc(name):
    torch.set_num_threads(1)
    task = get_pretext(name)
    net = tiny_resenc(1 + task.num_extra_input_channels(), task.num_output_channels(1))
    attach_conditioning(net, task)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 32, 32, 32)
    ctx = {"patch_bbox": torch.tensor([[[0, 32]] * 3, [[4, 36]] * 3]), "volume_shape": torch.tensor([[40] * 3] * 2)}
    sample = task.corrupt(x, g, ctx)
    pred = task.forward(net, sample)
    if name == "voco":  # contrastive: (4 base + 4 target crops) per sample -> embeddings, overlap targets
        assert sample.input.shape == (2 * 20, 1, 8, 8, 32) and sample.target.shape == (2, 4, 16)
        assert pred.shape == (2, 20, 2048)
    else:
        assert sample.input.shape == (2, 1 + task.num_extra_input_channels(), 32, 32, 32)
        assert pred.shape == sample.target.shape == (2, task.num_output_channels(1), 32, 32, 32)
    loss = task.loss(pred, sample)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert net.encoder.stem.convs[0].conv.weight.grad.abs().sum() > 0
    if name != "voco":
        assert net.decoder.seg_layers[-1].weight.grad.abs().sum() > 0
    prev = task.preview(sample, pred)
    if name != "voco":
        assert {"input", "corrupted", "prediction", "target"} <= set(prev)
    assert all(v.ndim == 3 and v.device.type == "cpu" for v in prev.values())
    # the encoder keys are those of the plain network: they load strictly into a fresh one
    fresh = tiny_resenc(1 + task.num_extra_input_channels(), task.num_output_channels(1))
    enc = {k[len("encoder."):]: v for k, v in net.state_dict().items() if k.startswith("encoder.")}
    fresh.encoder.load_state_dict(enc, strict=True)


# -- every task: the loss goes down on data made here -------------------------------------------------------
LEARN = {"mae": {"block_size": 4}, "model_genesis": {}, "diffusion": {}, "s3d": {"block_size": 4},
         "voco": {"region_size": None, "base_crops": (2, 2, 1), "hidden_dim": 64, "embed_dim": 32}}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LEARN))
def test_short_training_run_lowers_the_loss(name):
    """40 Adam steps on 16³ blob patches; the loss on a fixed corrupted evaluation set must fall clearly.

    For MAE and Model Genesis it must also beat the trivial predictor (all zeros = the z-score mean), which
    needs the network to use its input (for Model Genesis: detect inverted intensities, undo the curve).
    """
    torch.set_num_threads(1)
    vols = blob_volumes(8, 16, seed=0)
    task = get_pretext(name, **LEARN[name])
    net = tiny_resenc(1 + task.num_extra_input_channels(), task.num_output_channels(1))
    attach_conditioning(net, task)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g_eval = torch.Generator().manual_seed(100)
    evals = [task.corrupt(vols, g_eval) for _ in range(2)]

    def eval_loss() -> float:
        with torch.no_grad():
            return float(np.mean([task.loss(task.forward(net, s), s).item() for s in evals]))

    trivial = float("nan") if name == "voco" else float(np.mean([task.loss(torch.zeros_like(s.target), s).item()
                                                                for s in evals]))
    before = eval_loss()
    g = torch.Generator().manual_seed(0)
    train = []
    for _ in range(40):
        s = task.corrupt(vols[torch.randint(0, 8, (2,), generator=g)], g)
        loss = task.loss(task.forward(net, s), s)
        opt.zero_grad()
        loss.backward()
        opt.step()
        train.append(loss.item())
    after = eval_loss()
    msg = f"{name}: eval {before:.3f} -> {after:.3f} (trivial {trivial:.3f}); train {train[:5]} ... {train[-5:]}"
    assert after < 0.85 * before, msg
    if name != "voco":  # 2 samples x 2 target crops per step: the VoCo training loss is too noisy for this check
        assert np.mean(train[-5:]) < np.mean(train[:5]), msg
    if name not in ("diffusion", "voco"):  # zero embeddings have no defined cosine
        assert after < 0.95 * trivial, msg


# -- every task: checkpoint with the adaptation plan -> dense downstream network ------------------------------
def _tiny_plans() -> dict:
    from nnpre.architecture import unet_arch_kwargs

    kw = unet_arch_kwargs([4, 8, 16, 32], [[3, 3, 3]] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3, [1, 1, 1, 1], [1, 1, 1])
    return {"plans_name": "TinyPlans", "dataset_name": "Dataset999_T", "configurations": {"3d_fullres": {
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                         "arch_kwargs": kw, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "patch_size": [32, 32, 32], "spacing": [1.0, 1.0, 1.0], "batch_size": 2, "data_identifier": "tiny",
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False]}}}


@pytest.mark.parametrize("name", list_pretexts())
def test_checkpoint_with_adaptation_plan_transfers_to_a_dense_encoder(name, tmp_path):
    """Pretraining network (task modules attached, one step taken) -> checkpoint as the trainer writes it ->
    ``nnpre.weight_transfer`` into the dense network the plan builds: strict load, identical encoder outputs."""
    from nnpre.adaptation_plan import from_nnunet_plans
    from nnpre.checkpoints import read_pretrained
    from nnpre.weight_transfer import transfer_encoder

    torch.set_num_threads(1)
    task = get_pretext(name, **({"block_size": 4} if name in ("mae", "s3d") else {}))
    net = tiny_resenc(1 + task.num_extra_input_channels(), task.num_output_channels(1))
    attach_conditioning(net, task)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = blob_volumes(2, 32, seed=3)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    task.loss(task.forward(net, s), s).backward()
    opt.step()
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(task.config).items()}
    plan = from_nnunet_plans(_tiny_plans(), "3d_fullres", 1, pretext=name, pretext_config=cfg)
    torch.save({"network_weights": net.state_dict(), "nnssl_adaptation_plan": plan.to_dict()}, tmp_path / "ck.pth")
    ck = read_pretrained(tmp_path / "ck.pth")
    assert ck.plan.pretext == name
    down = ck.plan.build_network(1, 3)
    report = transfer_encoder(ck, down)
    assert report.loaded and all(k.startswith("encoder.") for k in report.loaded)
    with torch.no_grad():
        pre, got = net.encoder(x), down.encoder(x)  # outside task.forward the pretraining encoder is the dense one
    assert all(float((a - b).abs().max()) < 1e-5 for a, b in zip(pre, got))
