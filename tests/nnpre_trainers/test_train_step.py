"""The shared optimisation step: loss parts returned, gradient clipped at 12, non-finite loss is an error."""
import pytest
import torch
from torch import nn

from nnpre.errors import NnPreError
from nnpre_trainers.train_step import GRAD_CLIP, train_step


def test_step_clips_and_returns_parts():
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    x = torch.randn(8, 4) * 1e3
    before = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
    out = train_step(net, opt, lambda: {"loss": (net(x) ** 2).mean(), "part": torch.tensor(2.0)}, torch.device("cpu"))
    assert set(out) == {"loss", "part"} and out["part"] == 2.0 and isinstance(out["loss"], float)
    step = torch.nn.utils.parameters_to_vector(net.parameters()).detach() - before
    assert float(step.norm()) == pytest.approx(GRAD_CLIP, rel=1e-4)  # lr 1: the update is the clipped gradient


def test_non_finite_loss_is_one_line_error():
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(NnPreError, match="non-finite training loss \\(epoch 3\\)"):
        train_step(net, opt, lambda: {"loss": net(torch.ones(1, 2)).sum() * float("nan")}, torch.device("cpu"),
                   where="epoch 3")


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward (what the CPU bf16 Conv3d kernel sometimes returns)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("clip", [GRAD_CLIP, None])
def test_bf16_step_with_non_finite_gradient_is_skipped(clip):
    torch.manual_seed(0)
    net = nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
    x = torch.randn(8, 4)
    with pytest.warns(RuntimeWarning, match="non-finite gradient, optimizer step skipped \\(it 7\\)"):
        out = train_step(net, opt, lambda: {"loss": _NaNGrad.apply(net(x)).float().pow(2).mean()},
                         torch.device("cpu"), grad_clip=clip, where="it 7", amp="bf16")
    assert torch.isfinite(torch.tensor(out["loss"]))
    assert torch.equal(torch.nn.utils.parameters_to_vector(net.parameters()).detach(), before)
    # a finite bf16 step still updates the weights
    train_step(net, opt, lambda: {"loss": net(x).float().pow(2).mean()}, torch.device("cpu"), grad_clip=clip,
               amp="bf16")
    assert not torch.equal(torch.nn.utils.parameters_to_vector(net.parameters()).detach(), before)
