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


def _swa_schedule(total=12, main=6, every=3):
    from nnpre_trainers.finetune_schedule import ALL_GROUPS, FinetuneSchedule, LRRule, Stage

    return FinetuneSchedule(stages=(Stage("main", main, ALL_GROUPS, LRRule(warmup=2)),
                                    Stage("swa", None, ALL_GROUPS, LRRule(peak_lr=1e-3, decay="cyclic",
                                                                          cycle_length=every, cycle_start_lr=1e-5),
                                          keep_optimizer=True, average_every=every)),
                            total_iterations=total, base_lr=1e-2, momentum=0.9, grad_clip=None)


def _step(net, opt):
    opt.zero_grad()
    sum((p ** 2).sum() for p in net.parameters()).backward()
    opt.step()


def test_keep_optimizer_stage_continues_the_optimizer_and_averages_snapshots():
    """The SWA stage keeps the optimizer (momentum state) and averages the weights at its epoch starts; finish()
    makes the equal-weight mean of exactly those snapshots the network's weights."""
    torch.manual_seed(0)
    net = TinyUNet()
    sched = _swa_schedule()
    c = StageController(sched, lambda: parameter_groups(net, False), log=lambda s: None, network=lambda: net)
    opt0 = c.start(0)
    snaps = []
    for it in range(12):
        opt = c.enter(it)
        if it in (6, 9):  # first iteration of each SWA "epoch": the weights before its step
            snaps.append({n: p.detach().clone() for n, p in net.named_parameters()})
        _step(net, opt)
    assert opt is opt0 and c.switches == [(0, 0)]  # no new optimizer for the SWA stage
    assert c.average.n == 2 and c.average.last_iteration == 9
    assert c.finish() and c.average is None
    for n, p in net.named_parameters():
        assert torch.allclose(p, (snaps[0][n] + snaps[1][n]) / 2), n


def test_weight_average_resumes_from_its_state():
    """A run interrupted inside the SWA stage and resumed from its state ends with the same average."""
    torch.manual_seed(0)
    ref_net = TinyUNet()
    init = {k: v.clone() for k, v in ref_net.state_dict().items()}
    sched = _swa_schedule()
    ref = StageController(sched, lambda: parameter_groups(ref_net, False), log=lambda s: None,
                          network=lambda: ref_net)
    for it in range(12):
        _step(ref_net, ref.enter(it))
    ref.finish()

    net = TinyUNet()
    net.load_state_dict(init)
    c = StageController(sched, lambda: parameter_groups(net, False), log=lambda s: None, network=lambda: net)
    for it in range(8):  # stop inside the SWA stage (after one snapshot)
        _step(net, c.enter(it))
    state, opt_state = c.state_dict(), c.optimizer.state_dict()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    assert state["average"]["n"] == 1

    net2 = TinyUNet()
    c2 = StageController(sched, lambda: parameter_groups(net2, False), log=lambda s: None, network=lambda: net2)
    c2.start(8, stage_index=1)
    net2.load_state_dict(weights)
    c2.optimizer.load_state_dict(opt_state)
    c2.load_state_dict(state)
    for it in range(8, 12):
        _step(net2, c2.enter(it))
    assert c2.average.n == 2 and c2.finish()
    for (n, p), q in zip(net2.named_parameters(), ref_net.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_schedule_needing_the_network_says_so():
    net = TinyUNet()
    with pytest.raises(ValueError, match="network="):
        StageController(_swa_schedule(), lambda: parameter_groups(net, False), log=lambda s: None)
