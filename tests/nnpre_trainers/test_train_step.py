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
