"""Fine-tuning schedule as data: 5 % decoder-first stage, LR rules, by-name groups, frozen encoder."""
import json

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnpre_trainers.finetune_schedule import (
    FinetuneSchedule,
    LRRule,
    Stage,
    apply_stage,
    default_schedule,
    parameter_groups,
)

torch.set_num_threads(1)


def tiny_resenc(in_ch=1, classes=2):
    return ResidualEncoderUNet(in_ch, 4, [4, 8, 16, 32], nn.Conv3d, 3, [1, 2, 2, 2], [1, 1, 1, 1], classes,
                               [1, 1, 1], conv_bias=True, norm_op=nn.InstanceNorm3d,
                               norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                               nonlin_kwargs={"inplace": True}, deep_supervision=False)


def test_default_stage_boundaries_at_five_percent():
    s = default_schedule(1000)
    assert s.boundaries() == [(0, 50), (50, 1000)]
    assert s.stage_at(0)[0] == 0 and s.stage_at(49)[0] == 0
    assert s.stage_at(50)[0] == 1 and s.stage_at(999)[0] == 1 and s.stage_at(5000)[0] == 1
    assert default_schedule(1000 * 250).boundaries()[0] == (0, 12500)  # nnU-Net: 50 of 1000 epochs
    assert default_schedule(30).boundaries() == [(0, 2), (2, 30)]  # 1.5 rounds half up
    i, st = s.stage_at(10)
    assert st.name == "decoder_warmup" and set(st.trains) == {"decoder", "heads", "stem"}
    assert set(s.stages[1].trains) >= {"encoder", "stem", "decoder", "heads"}
    assert (s.base_lr, s.momentum, s.nesterov, s.weight_decay) == (1e-3, 0.99, True, 3e-5)
    with pytest.raises(ValueError):
        s.stage_at(-1)


def test_lr_rules_warmup_then_poly_per_stage():
    s = default_schedule(1000)
    lr = 1e-3
    # stage 1: linear warm-up over 25 iterations (2.5 %), then poly over the remaining 25
    assert s.lr_at(0) == pytest.approx(lr / 25)
    assert s.lr_at(24) == pytest.approx(lr)
    assert s.lr_at(25) == pytest.approx(lr)
    assert s.lr_at(49) == pytest.approx(lr * (1 - 24 / 25) ** 0.9)
    # stage 2: linear warm-up over 50 iterations (5 %), then poly with offset
    assert s.lr_at(50) == pytest.approx(lr / 50)
    assert s.lr_at(99) == pytest.approx(lr)
    assert s.lr_at(100) == pytest.approx(lr)
    assert s.lr_at(550) == pytest.approx(lr * (1 - 450 / 900) ** 0.9)
    assert s.lr_at(999) == pytest.approx(lr * (1 - 899 / 900) ** 0.9)
    lrs = [s.lr_at(i) for i in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_from_scratch_is_one_whole_network_stage_with_poly():
    s = default_schedule(200, pretrained=False)
    assert len(s.stages) == 1 and s.base_lr == 1e-2 and s.boundaries() == [(0, 200)]
    assert s.lr_at(0) == pytest.approx(1e-2)
    assert s.lr_at(100) == pytest.approx(1e-2 * 0.5 ** 0.9)


def test_schedule_is_data_round_trip_and_validation():
    s = FinetuneSchedule(stages=(Stage("heads", 10, ("heads",), LRRule(peak_lr=0.5, decay="constant")),
                                 Stage("rest", None, ("encoder", "decoder", "heads"), LRRule(warmup=0.1))),
                         total_iterations=100)
    assert FinetuneSchedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.lr_at(3) == 0.5 and s.boundaries() == [(0, 10), (10, 100)]
    with pytest.raises(ValueError, match="unknown parameter groups"):
        Stage("x", 0.1, ("backbone",))
    with pytest.raises(ValueError, match="cover 10 of 100"):
        FinetuneSchedule(stages=(Stage("a", 10, ("heads",)),), total_iterations=100)
    with pytest.raises(ValueError, match="fraction"):
        FinetuneSchedule(stages=(Stage("a", 1.5, ("heads",)),), total_iterations=100)
    with pytest.raises(ValueError, match="only the last stage"):
        FinetuneSchedule(stages=(Stage("a", None, ("heads",)), Stage("b", None, ("heads",))), total_iterations=10)


@pytest.mark.parametrize("factory", [tiny_resenc, lambda: PlainConvUNet(
    1, 3, [4, 8, 16], nn.Conv3d, 3, [1, 2, 2], 2, 2, 1, conv_bias=True, norm_op=nn.InstanceNorm3d,
    norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)])
def test_parameter_groups_by_name_partition_the_network(factory):
    net = factory()
    enc_ids = {id(p) for p in net.encoder.parameters()}
    # the pitfall: decoder.parameters() contains the encoder
    assert enc_ids & {id(p) for p in net.decoder.parameters()}
    g = parameter_groups(net, remapped_stem=False)
    ids = {name: {id(p) for _, p in items} for name, items in g.items()}
    assert ids["encoder"] == enc_ids and ids["stem"] == set()
    assert ids["heads"] == {id(p) for p in net.decoder.seg_layers.parameters()}
    assert not (ids["decoder"] & enc_ids) and not (ids["decoder"] & ids["heads"])
    all_ids = {id(p) for p in net.parameters()}
    assert set().union(*ids.values()) == all_ids and sum(len(v) for v in g.values()) == len(all_ids)
    assert all(n.startswith("decoder.") and not n.startswith("decoder.encoder.") for n, _ in g["decoder"])
    g2 = parameter_groups(net, remapped_stem=True)
    stem_ids = {id(p) for p in net.get_submodule(net.key_to_stem).parameters()}
    assert {id(p) for _, p in g2["stem"]} == stem_ids and not stem_ids & {id(p) for _, p in g2["encoder"]}
    s = default_schedule(100)
    names = s.trainable_names(0, g2)
    assert set(names) == {n for k in ("decoder", "heads", "stem") for n, _ in g2[k]}


def _sgd_steps(net, schedule, groups, iterations, seed):
    gen = torch.Generator().manual_seed(seed)
    stage_idx, stage = schedule.stage_at(iterations[0])
    params = apply_stage(groups, stage)
    opt = torch.optim.SGD(params, **schedule.optimizer_kwargs(iterations[0]))
    for it in iterations:
        assert schedule.stage_at(it)[0] == stage_idx
        for pg in opt.param_groups:
            pg["lr"] = schedule.lr_at(it)
        x = torch.randn(2, 1, 16, 16, 16, generator=gen)
        y = torch.randn(2, 2, 16, 16, 16, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("remapped_stem", [False, True])
def test_stage1_leaves_the_encoder_bit_identical_and_stage2_trains_it(remapped_stem):
    torch.manual_seed(0)
    net = tiny_resenc()
    groups = parameter_groups(net, remapped_stem=remapped_stem)
    schedule = FinetuneSchedule(stages=default_schedule(100).stages, total_iterations=100, base_lr=0.05)
    snap = {k: v.clone() for k, v in net.state_dict().items()}
    _sgd_steps(net, schedule, groups, [2, 3, 4], seed=1)  # inside stage 1 (iterations 0..4)
    sd = net.state_dict()
    stem_prefixes = ("encoder.stem.", "decoder.encoder.stem.")
    for k, v in sd.items():
        if k.startswith(("encoder.", "decoder.encoder.")):
            if remapped_stem and k.startswith(stem_prefixes):
                continue
            assert torch.equal(v, snap[k]), f"frozen tensor moved: {k}"
    assert any(not torch.equal(sd[k], snap[k]) for k in sd if k.startswith("decoder.stages."))
    assert any(not torch.equal(sd[k], snap[k]) for k in sd if k.startswith("decoder.seg_layers."))
    stem_w = "encoder.stem.convs.0.conv.weight"
    assert torch.equal(sd[stem_w], snap[stem_w]) != remapped_stem  # remapped stem trains in stage 1
    # stage 2: the whole network
    snap2 = {k: v.clone() for k, v in sd.items()}
    _sgd_steps(net, schedule, groups, [10, 11], seed=2)
    sd = net.state_dict()
    moved = [k for k in sd if k.startswith("encoder.stages.") and not torch.equal(sd[k], snap2[k])]
    assert len(moved) > 0.5 * len([k for k in sd if k.startswith("encoder.stages.")])
    assert all(p.requires_grad for p in net.parameters())



def test_optimizer_choice_is_data_and_round_trips():
    import torch

    from nnpre_trainers.finetune_schedule import FinetuneSchedule, default_schedule

    p = [torch.nn.Parameter(torch.zeros(3))]
    sgd = default_schedule(100, pretrained=False)
    assert isinstance(sgd.build_optimizer(p), torch.optim.SGD) and sgd.optimizer_kwargs()["momentum"] == 0.99
    adam = default_schedule(100, pretrained=True, optimizer="adamw", base_lr=2e-3)
    opt = adam.build_optimizer(p, iteration=50)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == adam.lr_at(50)
    assert FinetuneSchedule.from_dict(adam.to_dict()) == adam
    with pytest.raises(ValueError, match="optimizer must be one of"):
        default_schedule(10, optimizer="lamb")


def test_lr_rule_start_lr_step_offset_and_cycle_by_hand():
    # nnDetection-style: warm-up from 0.1 over 2, then poly (gamma 1) with the scheduler's +1 step, clamped
    s = FinetuneSchedule(stages=(Stage("a", None, ("encoder",), LRRule(warmup=2, warmup_start_lr=0.1, step_offset=1,
                                                                       exponent=1.0)),),
                         total_iterations=7, base_lr=1.0)
    assert [s.lr_at(i) for i in range(7)] == pytest.approx([0.55, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    cyc = LRRule(peak_lr=1.0, decay="cyclic", cycle_length=4, cycle_start_lr=0.2)
    s = FinetuneSchedule(stages=(Stage("c", None, ("encoder",), cyc),), total_iterations=9)
    assert [s.lr_at(i) for i in range(9)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.2, 0.4, 0.6, 0.8, 0.2])
    with pytest.raises(ValueError, match="cycle_length"):
        LRRule(decay="cyclic")
    with pytest.raises(ValueError, match="step_offset"):
        LRRule(step_offset=2)


def test_keep_optimizer_and_clip_validation_and_round_trip():
    a = Stage("a", 5, ("encoder", "decoder"))
    with pytest.raises(ValueError, match="same"):
        FinetuneSchedule(stages=(a, Stage("b", None, ("decoder",), keep_optimizer=True)), total_iterations=10)
    with pytest.raises(ValueError, match="first stage"):
        FinetuneSchedule(stages=(Stage("b", None, ("decoder",), keep_optimizer=True),), total_iterations=10)
    with pytest.raises(ValueError, match="grad_clip"):
        FinetuneSchedule(stages=(a, Stage("b", None, ("decoder",))), total_iterations=10, grad_clip=0)
    with pytest.raises(ValueError, match="average_every"):
        Stage("b", None, ("decoder",), average_every=0)
    s = FinetuneSchedule(stages=(a, Stage("b", None, ("decoder", "encoder"), LRRule(decay="cyclic", cycle_length=2),
                                          keep_optimizer=True, average_every=2)),
                         total_iterations=10, grad_clip=None, no_weight_decay_on_norm=True)
    back = FinetuneSchedule.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.grad_clip is None and back.stages[1].average_every == 2
    old = s.to_dict()
    del old["grad_clip"], old["no_weight_decay_on_norm"]
    for st in old["stages"]:
        del st["keep_optimizer"], st["average_every"]
    st = old["stages"][1]
    st["lr"] = {"peak_lr": None, "warmup": 0, "decay": "poly", "exponent": 0.9}
    assert FinetuneSchedule.from_dict(old).grad_clip == 12.0  # checkpoints written before these fields
