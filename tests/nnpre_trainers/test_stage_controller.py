"""StageController: one optimizer per stage, built when the stage's first iteration starts; per-iteration LR."""
import pytest
import torch
from torch import nn

from nnpre_trainers.finetune_schedule import default_schedule, parameter_groups, pretrain_schedule
from nnpre_trainers.stage_controller import StageController


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 3))
        self.decoder = nn.Module()
        self.decoder.stages = nn.Sequential(nn.Linear(3, 3))
        self.decoder.seg_layers = nn.Sequential(nn.Linear(3, 2))


def _controller(schedule, net):
    return StageController(schedule, lambda: parameter_groups(net, False), log=lambda s: None)


def test_switch_happens_once_at_the_boundary_iteration():
    net = TinyUNet()
    sched = default_schedule(20, pretrained=True, warmup_fraction=0.25)  # stage 0 = iterations 0..4
    c = _controller(sched, net)
    opt0 = c.start(0)
    seen = []
    for it in range(20):
        opt = c.enter(it)
        seen.append(opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr_at(it))
    assert c.switches == [(0, 0), (5, 1)]  # one optimizer per stage, the second built exactly at iteration 5
    assert all(o is opt0 for o in seen[:5]) and all(o is seen[5] for o in seen[5:]) and seen[5] is not opt0
    enc = {id(p) for p in net.encoder.parameters()}
    assert not any(id(p) in enc for g in opt0.param_groups for p in g["params"])  # encoder frozen in stage 0
    assert all(p.requires_grad for p in net.encoder.parameters())  # stage 1 unfroze it again
    assert any(id(p) in enc for g in seen[5].param_groups for p in g["params"])


def test_resume_restores_the_checkpointed_stage_then_switches():
    net = TinyUNet()
    sched = default_schedule(20, pretrained=True, warmup_fraction=0.25)
    c = _controller(sched, net)
    c.start(5, stage_index=0)  # checkpoint written at the end of stage 0
    assert c.stage_index == 0 and c.switches == [(5, 0)]
    c.enter(5)
    assert c.stage_index == 1 and c.switches == [(5, 0), (5, 1)]


def test_pretrain_schedule_is_nnunet_poly_per_epoch():
    sched = pretrain_schedule(total_iterations=50, iterations_per_epoch=10, base_lr=1e-2)
    for epoch in range(5):
        expected = 1e-2 * (1 - epoch / 5) ** 0.9  # nnU-Net PolyLRScheduler at epoch start
        for it in range(10):
            assert sched.lr_at(epoch * 10 + it) == pytest.approx(expected)
    net = TinyUNet()
    opt = _controller(sched, net).start(0)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.99 and opt.defaults["nesterov"]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


def test_adapter_rule_keeps_rejected_parameters_out_of_every_stage():
    net = TinyUNet()
    sched = default_schedule(20, pretrained=True, warmup_fraction=0.25)
    c = StageController(sched, lambda: parameter_groups(net, False), log=lambda s: None,
                        may_train=lambda name: not name.endswith(".weight") or name.startswith("decoder.seg"))
    for it in (0, 5):
        opt = c.enter(it)
        names = {id(p): n for n, p in net.named_parameters()}
        trained = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        assert trained and all(not n.endswith(".weight") or n.startswith("decoder.seg") for n in trained)
    assert not net.encoder[0].weight.requires_grad and net.encoder[0].bias.requires_grad


def test_adapter_frozen_parameters_stay_frozen_under_ddp_keep_requires_grad():
    """DDP runs keep stage-frozen groups' requires_grad True (DDP fixes its parameters at wrap time), but
    parameters the adapter rejects are frozen in every stage and must stay False (else DDP expects gradients
    for the frozen encoder and syncs them)."""
    net = TinyUNet()
    sched = default_schedule(20, pretrained=True, warmup_fraction=0.25)
    rule = lambda name: not name.startswith("encoder.0")  # noqa: E731
    c = StageController(sched, lambda: parameter_groups(net, False), keep_requires_grad=True, log=lambda s: None,
                        may_train=rule)
    for it in (0, 5, 19):  # warm-up stage (decoder only) and the full stage
        c.enter(it)
        frozen = {n: p.requires_grad for n, p in net.named_parameters() if not rule(n)}
        assert frozen and not any(frozen.values()), (it, frozen)
        assert all(p.requires_grad for n, p in net.named_parameters() if rule(n))  # DDP's keep rule elsewhere
