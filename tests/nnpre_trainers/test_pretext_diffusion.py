"""Diffusion pretext: schedules, closed-form q_sample, timestep conditioning, key compatibility, features."""
import math

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnpre.errors import NnPreError
from nnpre_trainers.pretext import attach_conditioning, get_pretext
from nnpre_trainers.pretext.diffusion import beta_schedule, coordinate_channels, sinusoidal_embedding

FEATURES = [4, 8, 16, 32]


def tiny_resenc(cin: int, cout: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ResidualEncoderUNet(cin, 4, FEATURES, nn.Conv3d, 3, [1, 2, 2, 2], [1, 1, 1, 1], cout, [1, 1, 1],
                               conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                               nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def tiny_plain(cin: int, cout: int) -> nn.Module:
    torch.manual_seed(0)
    return PlainConvUNet(cin, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], 1, cout, 1, conv_bias=True,
                         norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def test_linear_schedule_known_values():
    task = get_pretext("diffusion")
    b, a = task.betas, task.alphas_cumprod
    assert b.shape == (1000,) and b.dtype == torch.float64
    assert math.isclose(b[0].item(), 1e-4) and math.isclose(b[-1].item(), 0.02)  # Ho et al. 2020
    assert math.isclose(a[0].item(), 0.9999)
    assert math.isclose(a[-1].item(), 4.0358e-5, rel_tol=1e-3)  # the well-known ᾱ_T of DDPM
    prod = 1.0
    for t in range(61):
        prod *= 1 - (1e-4 + (0.02 - 1e-4) * t / 999)
    assert math.isclose(a[60].item(), prod, rel_tol=1e-9)


def test_cosine_schedule_matches_formula():
    task = get_pretext("diffusion", schedule="cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 250, 500, 900):
        assert math.isclose(task.alphas_cumprod[t].item(), f(t + 1) / f(0), rel_tol=1e-6)
    assert task.betas.max().item() <= 0.999
    with pytest.raises(NnPreError, match="schedule"):
        get_pretext("diffusion", schedule="quadratic")


def test_q_sample_equals_iterated_forward_process():
    task = get_pretext("diffusion")
    b = task.betas
    x0 = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    for t in (0, 10, 60, 500, 999):
        mean_coef, var = 1.0, 0.0  # x_t = prod sqrt(1 - b) x0 + Gaussian with variance v_t
        for s in range(t + 1):
            mean_coef *= math.sqrt(1 - b[s].item())
            var = (1 - b[s].item()) * var + b[s].item()
        tt = torch.tensor([t])
        assert torch.allclose(task.q_sample(x0, tt, torch.zeros_like(x0)), mean_coef * x0, rtol=1e-9)
        assert torch.allclose(task.q_sample(torch.zeros_like(x0), tt, torch.ones_like(x0)),
                              torch.full_like(x0, math.sqrt(var)), rtol=1e-9)


def test_q_sample_distribution_by_monte_carlo():
    task = get_pretext("diffusion")
    g = torch.Generator().manual_seed(0)
    n, t = 40_000, 30
    x = torch.full((n,), 1.5, dtype=torch.float64)
    for s in range(t + 1):  # step by step: x_s = sqrt(1 - b_s) x_{s-1} + sqrt(b_s) eps_s
        x = (1 - task.betas[s]).sqrt() * x + task.betas[s].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    a = task.alphas_cumprod[t]
    assert abs(x.mean().item() - a.sqrt().item() * 1.5) < 5 * math.sqrt((1 - a.item()) / n)
    assert abs(x.std().item() - (1 - a).sqrt().item()) < 0.02 * (1 - a).sqrt().item()


def test_corrupt_samples_uniform_timesteps_and_noise_target():
    task = get_pretext("diffusion")
    x = torch.randn(500, 1, 2, 2, 2)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    t = s.extras["t"]
    assert t.shape == (500,) and t.dtype == torch.long and t.min() >= 0 and t.max() < 1000
    assert abs(t.float().mean().item() - 499.5) < 4.5 * 288.7 / math.sqrt(500)
    assert torch.allclose(s.input, task.q_sample(x, t, s.target)) and s.loss_mask is None
    assert abs(s.target.std().item() - 1) < 0.05
    again = task.corrupt(x, torch.Generator().manual_seed(0))
    assert torch.equal(again.input, s.input) and torch.equal(again.extras["t"], t)


def test_building_conditioning_keeps_network_keys():
    task = get_pretext("diffusion")
    net = tiny_resenc(1, 1)
    keys = list(net.state_dict())
    cond = task.build_conditioning(net)
    assert list(net.state_dict()) == keys  # building registers nothing on the network
    attach_conditioning(net, task)
    new = list(net.state_dict())
    extra = [k for k in new if k not in keys]
    assert [k for k in new if k in keys] == keys
    assert extra and all(k.startswith("nnpre_conditioning.") for k in extra)
    assert len(extra) == len(cond.state_dict())
    # the pretrained encoder keys load into a plain network of the same plans
    plain = tiny_resenc(1, 1, seed=1)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("nnpre_")})


def test_timestep_changes_output_and_no_hooks():
    task = get_pretext("diffusion")
    net = tiny_resenc(1, 1)
    attach_conditioning(net, task)
    _train_film(net)
    x = torch.randn(2, 1, 16, 16, 16)
    s = task.corrupt(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = net(s.input)
        s.extras["t"] = torch.tensor([5, 5])
        out5 = task.forward(net, s)
        s.extras["t"] = torch.tensor([700, 700])
        out700 = task.forward(net, s)
        assert not torch.allclose(out5, out700, atol=1e-4)
        assert not torch.allclose(out5, plain, atol=1e-4)
        s.extras["t"] = torch.tensor([10, 10])  # t* = transfer_timestep: the plain network
        assert torch.allclose(task.forward(net, s), plain, atol=1e-6)
        assert torch.allclose(net(s.input), plain)  # the modulation exists only during task.forward
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in net.modules())
    assert net.nnpre_conditioning.ctx.film is None


def _train_film(net):
    """Give the zero-initialised FiLM output layer random weights (as after training)."""
    torch.manual_seed(3)
    with torch.no_grad():
        net.nnpre_conditioning.film[1].weight.normal_(0, 0.05)
        net.nnpre_conditioning.film[1].bias.normal_(0, 0.05)


def test_transferred_encoder_equals_pretraining_encoder_at_t_star():
    """What fine-tuning loads (encoder.* keys into a fresh plain U-Net) computes as the pretraining encoder at t*."""
    from nnpre.checkpoints import pretrained_from_dict
    from nnpre.weight_transfer import transfer_encoder

    task = get_pretext("diffusion")
    net = tiny_resenc(1, 1)
    attach_conditioning(net, task)
    _train_film(net)
    with torch.no_grad():
        for p in net.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fresh = tiny_resenc(1, 2, seed=7)
    transfer_encoder(pretrained_from_dict({"network_weights": net.state_dict()}), fresh)
    x = torch.randn(2, 1, 16, 16, 16)
    cond = net.nnpre_conditioning
    with torch.no_grad():
        cond.ctx.film = cond(torch.tensor([10, 10]))
        pre = net.encoder(x)
        cond.ctx.film = cond(torch.tensor([60, 60]))
        other = net.encoder(x)
        cond.ctx.film = None
        down = fresh.encoder(x)
    for a, b in zip(pre, down):
        assert float((a - b).abs().max()) < 1e-5
    assert float((other[-1] - down[-1]).abs().max()) > 1e-3  # the conditioning is not trivial


def test_fold_timestep_bakes_any_t_into_the_norm_affines():
    from nnpre_trainers.pretext.diffusion import fold_timestep

    task = get_pretext("diffusion", transfer_timestep=30)
    net = tiny_resenc(1, 1)
    attach_conditioning(net, task)
    _train_film(net)
    x = torch.randn(1, 1, 16, 16, 16)
    plain = tiny_resenc(1, 1, seed=5)
    cond = net.nnpre_conditioning
    for t in (30, 60):
        plain.load_state_dict(fold_timestep(net, t))
        with torch.no_grad():
            cond.ctx.film = cond(torch.tensor([t]))
            ref = net.encoder(x)
            cond.ctx.film = None
            got = plain.encoder(x)
        assert all(float((a - b).abs().max()) < 1e-5 for a, b in zip(ref, got))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in fold_timestep(net, 30).items())


@pytest.mark.slow
def test_pretraining_under_torch_compile_matches_eager():
    """A few SGD steps with the network compiled (inductor, CPU) give the losses of eager mode."""
    import copy

    torch.set_num_threads(1)
    task = get_pretext("diffusion", time_embed_dim=16)
    eager = tiny_resenc(1, 1)
    attach_conditioning(eager, task)
    _train_film(eager)
    other = copy.deepcopy(eager)
    compiled = torch.compile(other)
    g = torch.Generator().manual_seed(0)
    samples = [task.corrupt(torch.randn(2, 1, 16, 16, 16, generator=g), g) for _ in range(3)]
    losses = {}
    for name, model, params in (("eager", eager, eager.parameters()), ("compiled", compiled, other.parameters())):
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        losses[name] = []
        for s in samples:
            loss = task.loss(task.forward(model, s), s)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(float(loss.detach()))
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-5), losses
    assert losses["eager"][0] != losses["eager"][-1]


def test_conditioning_gets_gradients():
    task = get_pretext("diffusion")
    net = tiny_resenc(1, 1)
    attach_conditioning(net, task)
    s = task.corrupt(torch.randn(2, 1, 16, 16, 16), torch.Generator().manual_seed(0))
    task.loss(task.forward(net, s), s).backward()
    grads = [p.grad for p in net.nnpre_conditioning.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert net.encoder.stem.convs[0].conv.weight.grad is not None


def test_forward_without_conditioning_is_a_clear_error():
    task = get_pretext("diffusion")
    net = tiny_resenc(1, 1)
    s = task.corrupt(torch.randn(1, 1, 16, 16, 16), torch.Generator().manual_seed(0))
    with pytest.raises(NnPreError, match="nnpre_conditioning"):
        task.forward(net, s)
    with pytest.raises(NnPreError, match="encoder.stages"):
        task.build_conditioning(nn.Conv3d(1, 1, 3))


def test_extract_features_have_encoder_stage_shapes():
    task = get_pretext("diffusion")
    net = tiny_resenc(1, 1)
    attach_conditioning(net, task)
    x = torch.randn(2, 1, 16, 16, 16)
    feats = task.extract_features(net, x, generator=torch.Generator().manual_seed(0))
    assert sorted(feats) == [10, 30, 60]
    expected = [(2, c, 16 // 2 ** i, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate(FEATURES)]
    for t, stages in feats.items():
        assert [tuple(f.shape) for f in stages] == expected
        assert not any(f.requires_grad for f in stages)
    assert not torch.allclose(feats[10][-1], feats[60][-1])
    again = task.extract_features(net, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[30][0], feats[30][0])


def test_coordinate_channels_from_bbox_and_fallback():
    ctx = {"patch_bbox": torch.tensor([[[0, 4], [2, 6], [-2, 2]]]), "volume_shape": torch.tensor([[9, 6, 5]])}
    c = coordinate_channels((1, 1, 4, 4, 4), ctx)
    assert c.shape == (1, 3, 4, 4, 4)
    assert torch.allclose(c[0, 0, :, 0, 0], torch.tensor([-1.0, -0.75, -0.5, -0.25]))  # 2 i / 8 - 1
    assert torch.allclose(c[0, 1, 0, :, 0], torch.tensor([-0.2, 0.2, 0.6, 1.0]))  # 2 i / 5 - 1, i = 2..5
    assert torch.allclose(c[0, 2, 0, 0, :], torch.tensor([-2.0, -1.5, -1.0, -0.5]))  # padded: beyond -1
    fallback = coordinate_channels((2, 1, 3, 4, 5))
    assert torch.allclose(fallback[1, 2, 0, 0], torch.linspace(-1, 1, 5))
    with pytest.raises(NnPreError, match="patch shape"):
        coordinate_channels((1, 1, 5, 4, 4), ctx)


def test_coord_channels_task_end_to_end_on_plain_unet():
    task = get_pretext("diffusion", coord_channels=True, time_embed_dim=16)
    assert task.num_extra_input_channels() == 3 and task.num_output_channels(1) == 1
    net = tiny_plain(1 + 3, 1)
    attach_conditioning(net, task)
    ctx = {"patch_bbox": torch.tensor([[[0, 8]] * 3, [[8, 16]] * 3]), "volume_shape": torch.tensor([[16] * 3] * 2)}
    s = task.corrupt(torch.randn(2, 1, 8, 8, 8), torch.Generator().manual_seed(0), ctx)
    assert s.input.shape == (2, 4, 8, 8, 8)
    assert s.input[0, 1].min() == -1 and s.input[1, 1].max() == 1
    loss = task.loss(task.forward(net, s), s)
    loss.backward()
    assert torch.isfinite(loss)
    feats = task.extract_features(net, torch.randn(2, 1, 8, 8, 8), timesteps=[10], context=ctx)
    assert [f.shape[1] for f in feats[10]] == [4, 8, 16]


def test_denoise_preview_recovers_x0_with_perfect_noise_prediction():
    task = get_pretext("diffusion")
    x = torch.randn(2, 1, 8, 8, 8)
    s = task.corrupt(x, torch.Generator().manual_seed(3))
    s.extras["t"] = torch.tensor([20, 400])
    s.input = task.q_sample(x, s.extras["t"], s.target)
    assert torch.allclose(task.denoise_preview(s, s.target), x, atol=1e-4)
    prev = task.preview(s, s.target)
    assert {"input", "corrupted", "prediction", "target"} <= set(prev)
    assert torch.allclose(prev["input"], x[0, 0], atol=1e-4)


def test_sinusoidal_embedding_shape_and_distinct_rows():
    e = sinusoidal_embedding(torch.tensor([0, 1, 500]), 17)
    assert e.shape == (3, 17) and torch.all(e[:, -1] == 0)
    assert torch.allclose(e[0, :8], torch.zeros(8)) and torch.allclose(e[0, 8:16], torch.ones(8))
    assert not torch.allclose(e[1], e[2])
    assert beta_schedule("linear", 10).shape == (10,)
