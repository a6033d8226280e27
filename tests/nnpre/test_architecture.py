"""nnpre.architecture: key layouts equal the network classes', unwrapping, state-dict inference."""
import pytest
import torch
from torch import nn

from nnpre.architecture import (
    DYNAMIC_CLASSES,
    KEY_LAYOUTS,
    KWARGS_REQUIRING_IMPORT,
    infer_arch_from_state_dict,
    key_layout,
    network_arch_kwargs,
    network_family,
    stage_description,
    unet_arch_kwargs,
    unwrap,
)
from nnpre.errors import NnPreError

torch.set_num_threads(1)


def build(family, kw, c_in=1):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(0)
    return get_network_from_plans(DYNAMIC_CLASSES[family], kw, KWARGS_REQUIRING_IMPORT, c_in, 2, allow_init=True,
                                  deep_supervision=False)


CASES = {
    "resenc_aniso": ("ResidualEncoderUNet", unet_arch_kwargs(
        [4, 8, 16], [[1, 3, 3], [3, 3, 3], [5, 5, 5]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [2, 1, 2], [2, 1],
        conv_bias=False), 2),
    "plain_one_conv_bn": ("PlainConvUNet", unet_arch_kwargs(
        [4, 8, 8, 16], [[3, 3, 3]] * 4, [[1, 1, 1], [2, 2, 1], [2, 2, 2], [1, 2, 2]], [1, 1, 1, 1], [1, 2, 1],
        blocks_key="n_conv_per_stage", norm_op="torch.nn.modules.batchnorm.BatchNorm3d",
        norm_op_kwargs={"eps": 1e-05, "momentum": 0.1}), 3),
}


@pytest.mark.parametrize("family", ["ResidualEncoderUNet", "PlainConvUNet"])
def test_key_layouts_are_the_network_classes_own(family):
    kw = unet_arch_kwargs([4, 8], [[3, 3, 3]] * 2, [[1, 1, 1], [2, 2, 2]], [1, 1], [1],
                          blocks_key="n_blocks_per_stage" if family == "ResidualEncoderUNet" else "n_conv_per_stage")
    net = build(family, kw)
    layout = KEY_LAYOUTS[family]
    assert (net.key_to_encoder, net.key_to_stem, list(net.keys_to_in_proj)) == \
        (layout["key_to_encoder"], layout["key_to_stem"], layout["keys_to_in_proj"])
    assert all(k + ".weight" in net.state_dict() for k in layout["keys_to_in_proj"])
    assert key_layout("ResEncL") == KEY_LAYOUTS["ResidualEncoderUNet"] and key_layout(family) is not layout


def test_unwrap_strips_compile_and_nested_wrappers():
    net = nn.Sequential(nn.Linear(2, 2))
    compiled = torch.compile(net)  # OptimizedModule, not compiled until called
    assert compiled is not net and unwrap(compiled) is net

    class Holder(nn.Module):  # an _orig_mod inside another _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert unwrap(Holder(Holder(net))) is net and unwrap(net) is net


@pytest.mark.parametrize("case", list(CASES))
def test_infer_reads_every_kwarg_from_a_full_state_dict(case):
    family, kw, c_in = CASES[case]
    net = build(family, kw, c_in)
    got = infer_arch_from_state_dict(net.state_dict())
    assert got.family == family and got.input_channels == c_in and got.strides_known
    assert got.arch_kwargs == kw
    assert network_family(net) == family and stage_description(network_arch_kwargs(net), family) == \
        stage_description(got.arch_kwargs, family)
    assert got.describe().startswith(f"inferred from the state dict: {family}")


def test_infer_from_encoder_only_flags_unknown_strides_and_uses_given_ones():
    family, kw, c_in = CASES["resenc_aniso"]
    enc = {k: v for k, v in build(family, kw, c_in).state_dict().items() if k.startswith("encoder.")}
    got = infer_arch_from_state_dict(enc)
    assert not got.strides_known and "unknown" in got.describe()
    assert got.arch_kwargs["n_conv_per_stage_decoder"] == [1, 1]  # nnssl default, stated as assumed
    assert any("decoder conv" in a for a in got.assumed)
    given = infer_arch_from_state_dict(enc, strides=kw["strides"])
    assert given.strides_known and given.arch_kwargs["strides"] == kw["strides"]
    with pytest.raises(NnPreError, match="--strides gives 2 stage"):
        infer_arch_from_state_dict(enc, strides=[[1, 1, 1], [2, 2, 2]])


def test_infer_refuses_what_it_cannot_tell():
    family, kw, c_in = CASES["resenc_aniso"]
    sd = build(family, kw, c_in).state_dict()
    with pytest.raises(NnPreError, match="contradicts the decoder"):
        infer_arch_from_state_dict(sd, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    no_norm = {k: v for k, v in sd.items() if ".norm." not in k and "all_modules.1" not in k}
    with pytest.raises(NnPreError, match="no normalisation parameters"):
        infer_arch_from_state_dict(no_norm)
    with pytest.raises(NnPreError, match="holds no nnU-Net U-Net encoder"):
        infer_arch_from_state_dict({"eva.pos_embed": torch.zeros(1)}, where="primus.pth")
