"""``nnPre_export``: turn a pretrained checkpoint into a file other tools load.

Examples::

    nnPre_export pretrain/checkpoint_final.pth -o mae_encoder.pth             # (a) encoder + plan (default)
    nnPre_export pretrain/checkpoint_final.pth -o mae_full.pth --full         # (b) for -pretrained_weights
    nnPre_export pretrain/checkpoint_final.pth -o mae_full_3ch.pth --full --input-channels 3

(a) ``--encoder-only``: ``network_weights`` restricted to the encoder and stem keys, plus the
``nnssl_adaptation_plan`` and ``citations`` (:mod:`nnpre.citations`); the nnssl / nnU-Net master
``PretrainedTrainer`` convention. Loads with
``torch.load(..., weights_only=True)``.

(b) ``--full``: every key of the planned network except the segmentation layers (all aliases included:
``all_modules.*`` and ``decoder.encoder.*``), with pretext-only keys (conditioning, extra heads)
dropped, so that stock ``nnUNetv2_train ... -pretrained_weights FILE`` accepts it for a target whose
plans give the same architecture (e.g. planned with ``nnPre_plan --like``). ``--input-channels N``
remaps the stem for an N-channel dataset with the rules of :mod:`nnpre.weight_transfer`.

(c) ``--full`` on a fine-tuned checkpoint of an adapter run (``nnPre_train finetune|detect --adapter lora``):
the adapter is merged into plain weights (:mod:`nnpre_trainers.adapters.export`; exact for LoRA, MoLRE only
with ``--approximate-molre``, probes refused) and the whole nnU-Net checkpoint is written with exactly the plain
network's keys and no optimizer state, to be used as ``checkpoint_final.pth`` by ``nnUNetv2_predict``.

Both files are written atomically (temporary file, verified with a safe reload, then renamed).
"""
from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from nnpre.checkpoints import ADAPTATION_PLAN_KEY, PretrainedCheckpoint, read_pretrained, safe_load
from nnpre.cli._common import ArgumentParser, cli_entry
from nnpre.errors import fail

SEG_LAYER_MARK = ".seg_layers."  # what stock nnU-Net's load_pretrained_weights skips


def encoder_checkpoint(ck: PretrainedCheckpoint) -> Dict[str, Any]:
    """(a) ``{"network_weights": encoder + stem keys, "nnssl_adaptation_plan": plan, "nnpre_export": info}``.

    Input channels a pretext task appended (``plan.extra_input_channels``) are dropped from the stem so
    the file describes a plain C-channel encoder.
    """
    from nnpre.weight_transfer import drop_pretext_input_channels

    ck, _ = drop_pretext_input_channels(ck)
    weights = ck.encoder_state_dict()
    if not weights:
        fail(f"{ck.path}: no keys under '{ck.plan.key_to_encoder}' or '{ck.plan.key_to_stem}'; nothing to export")
    return {
        "network_weights": weights,
        ADAPTATION_PLAN_KEY: ck.plan.to_dict(),
        "citations": _citations(ck),
        "nnpre_export": {"kind": "encoder", "source": os.path.basename(ck.path), "source_format": ck.source_format},
    }


def _citations(ck: PretrainedCheckpoint) -> List[Dict[str, Any]]:
    from nnpre.citations import citations_for

    return citations_for(ck.plan.pretext, ck.plan.network_class_name, ck.meta.get("citations"))


def full_checkpoint(ck: PretrainedCheckpoint, input_channels: Optional[int] = None,
                    target_channel_names: Any = None) -> Tuple[Dict[str, Any], List[str]]:
    """(b) a full-network checkpoint for stock ``load_pretrained_weights``.

    Builds the planned network (He init), loads every non-seg key of the checkpoint into it and saves
    its ``state_dict()`` without the seg layers, so every alias the stock loader asks for exists.

    Args:
        ck: the pretrained checkpoint (must contain the decoder, i.e. not an encoder-only export).
        input_channels: C of the downstream dataset; the stem is remapped when it differs.
        target_channel_names: downstream ``channel_names`` for the by-name stem rule.

    Returns:
        (checkpoint dict, list of checkpoint keys that were dropped).
    """
    from nnpre.weight_transfer import drop_pretext_input_channels, remap_stem_weight

    source_keys = list(ck.state_dict)
    ck, remapped = drop_pretext_input_channels(ck)
    sd = OrderedDict(ck.state_dict)
    c_pt = ck.stem_input_channels or ck.plan.pretrain_num_input_channels
    c_down = int(input_channels or c_pt)
    if c_down != c_pt or target_channel_names is not None:
        for key in ck.plan.keys_to_in_proj:
            k = f"{key}.weight"
            if k in sd:
                new = remap_stem_weight(sd[k], c_down, ck.plan.channel_names, target_channel_names)
                if k not in remapped and not (new.shape == sd[k].shape and bool((new == sd[k]).all())):
                    remapped.append(k)
                sd[k] = new
    seg = [k for k in sd if SEG_LAYER_MARK in k]
    n_out = int(sd[seg[0]].shape[0]) if seg else 1
    net = ck.plan.build_network(num_input_channels=c_down, num_output_channels=n_out)
    target = net.state_dict()
    needed = [k for k in target if SEG_LAYER_MARK not in k and not k.startswith("decoder.encoder.")]
    missing = [k for k in needed if k not in sd]
    if missing:
        fail(f"{ck.path}: the checkpoint lacks {len(missing)} keys of the planned network (first: {missing[0]}); "
             f"--full needs a full network checkpoint (an encoder-only file can only be exported with --encoder-only)")
    wrong = [f"{k}: checkpoint {list(sd[k].shape)}, planned {list(target[k].shape)}" for k in needed
             if tuple(sd[k].shape) != tuple(target[k].shape)]
    if wrong:
        fail(f"{ck.path}: weights do not match the checkpoint's own plan ({'; '.join(wrong[:4])}); the adaptation "
             f"plan is inconsistent with network_weights")
    net.load_state_dict({k: sd[k] for k in needed}, strict=False)
    weights = OrderedDict((k, v) for k, v in net.state_dict().items() if SEG_LAYER_MARK not in k)
    dropped = [k for k in source_keys if k not in weights]
    plan = ck.plan.to_dict()
    return {
        "network_weights": weights,
        ADAPTATION_PLAN_KEY: plan,
        "citations": _citations(ck),
        "nnpre_export": {"kind": "full", "source": os.path.basename(ck.path), "source_format": ck.source_format,
                         "input_channels": c_down, "remapped": remapped},
    }, dropped


def write_verified(obj: Dict[str, Any], path: str) -> None:
    """Atomically save ``obj`` and check the temporary file reloads with weights_only=True before renaming."""
    import torch

    from nnpre.atomic import write_with

    def writer(tmp: str) -> None:
        torch.save(obj, tmp)
        back = safe_load(tmp)
        if set(back["network_weights"]) != set(obj["network_weights"]):
            fail(f"{path}: written file does not reload identically; not replacing the target")

    write_with(writer, path)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="nnPre_export", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="pretrained checkpoint (nnpre, nnssl or nnU-Net format)")
    p.add_argument("-o", "--output", required=True, help="file to write (.pth)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--encoder-only", action="store_true",
                      help="(default) encoder + stem weights with the nnssl adaptation plan")
    mode.add_argument("--full", action="store_true",
                      help="full network without seg layers, for nnUNetv2_train -pretrained_weights")
    p.add_argument("--input-channels", type=int, default=None,
                   help="--full only: remap the stem to N input channels (default: the checkpoint's)")
    p.add_argument("--channel-names", default=None,
                   help="--full only: comma-separated downstream channel names (by-name stem remap)")
    p.add_argument("--approximate-molre", action="store_true",
                   help="--full of a MoLRE fine-tuning run: fold the experts at their mean training routing "
                        "(an approximation: MoLRE routing depends on each input)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    return p


def _export_merged_adapter(args: argparse.Namespace) -> bool:
    """(c): write the merged checkpoint when ``args.checkpoint`` is an adapter run's (not ``full``); else False."""
    from nnpre_trainers.adapters.export import adapter_record, merged_checkpoint

    raw = safe_load(args.checkpoint)
    record = adapter_record(raw)
    if not record or record.get("name") == "full":
        return False
    if args.input_channels is not None or args.channel_names is not None:
        fail(f"{args.checkpoint}: a fine-tuned {record['name']} run keeps its input channels; drop --input-channels "
             f"/ --channel-names")
    obj = merged_checkpoint(raw, approximate=args.approximate_molre)
    write_verified(obj, args.output)
    print(f"wrote {args.output}: fine-tuned network with the {record['name']} adapter merged "
          f"({'approximate' if obj['nnpre_adapter_merged']['approximate'] else 'exact'}), "
          f"{len(obj['network_weights'])} plain keys; use it as fold_X/checkpoint_final.pth of a copy of the run "
          f"folder for nnUNetv2_predict / nnPre_predict")
    return True


def run(args: argparse.Namespace) -> int:
    from nnpre.atomic import check_output_file

    check_output_file(args.output, inputs=[args.checkpoint], overwrite=args.overwrite)
    if not args.full and (args.input_channels is not None or args.channel_names is not None):
        fail("--input-channels / --channel-names only apply to --full exports (the encoder export keeps the "
             "pretrained stem; nnPre_train remaps it when fine-tuning)")
    if args.input_channels is not None and args.input_channels < 1:
        fail(f"--input-channels must be >= 1, got {args.input_channels}")
    names = [n.strip() for n in args.channel_names.split(",")] if args.channel_names else None
    if names is not None and args.input_channels is not None and len(names) != args.input_channels:
        fail(f"--channel-names lists {len(names)} names but --input-channels is {args.input_channels}")
    if args.full and _export_merged_adapter(args):
        return 0
    ck = read_pretrained(args.checkpoint)
    if args.full:
        obj, dropped = full_checkpoint(ck, input_channels=args.input_channels or (len(names) if names else None),
                                       target_channel_names=names)
        write_verified(obj, args.output)
        info = obj["nnpre_export"]
        print(f"wrote {args.output}: full network, {len(obj['network_weights'])} keys, {info['input_channels']} input "
              f"channel(s){' (stem remapped)' if info['remapped'] else ''}; dropped {len(dropped)} checkpoint keys "
              f"(seg layers / pretext-only)")
        print("use: nnUNetv2_train DATASET 3d_fullres FOLD -p PLANS -pretrained_weights " + args.output)
    else:
        obj = encoder_checkpoint(ck)
        write_verified(obj, args.output)
        print(f"wrote {args.output}: encoder + stem, {len(obj['network_weights'])} keys, adaptation plan "
              f"({ck.plan.network_class_name}, {ck.plan.pretrain_num_input_channels} input channel(s), "
              f"spacing {ck.plan.spacing}, patch {ck.plan.patch_size})")
    return 0


main = cli_entry(run, build_parser)

if __name__ == "__main__":
    main()
