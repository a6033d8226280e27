"""Fine-tuning trainer: encoder-only load, frozen encoder in the decoder-only stage, resume across stages."""
import json
import os

import pytest
import torch
from nnpre_testdata import write_pretrained_checkpoint

from planners.pipeline import plan_dataset


def _make(trainer_cls, did, continue_training=False):
    from nnpre_trainers.run import make_trainer

    t = make_trainer(trainer_cls, did, "nnPreResEncLPlans", fold="all", device="cpu",
                     continue_training=continue_training, epochs=4, iterations=5)
    t.num_val_iterations_per_epoch = 1
    t.save_every = 1
    t.show_progress = False
    return t


def _encoder(t):
    return {k: v.detach().clone() for k, v in t.unwrapped_network.state_dict().items() if k.startswith("encoder.")}


def test_finetune_stages_and_resume(nnunet_root, tmp_path):
    from nnpre_testdata import write_raw_dataset

    from nnpre_trainers.finetune_schedule import default_schedule
    from nnpre_trainers.finetune_trainer import nnPreFineTuneTrainer
    from nnpre_trainers.run import maybe_resume

    write_raw_dataset(nnunet_root, did=41, n_cases=3)
    r = plan_dataset(41, preset="cpu-tiny", num_processes=1)
    ckpt = str(tmp_path / "pre.pth")
    enc0 = write_pretrained_checkpoint(r.plans, ckpt)

    # stage 0 = first 25 % of 20 iterations = epoch 0 exactly (the default is 5 %; same code path)
    sched = default_schedule(20, pretrained=True, warmup_fraction=0.25)
    t = _make(nnPreFineTuneTrainer, 41)
    t.configure_finetuning(pretrained=ckpt, schedule=sched, tag="test")
    t.initialize()
    enc_loaded = _encoder(t)
    for k, v in enc0.items():
        assert torch.equal(enc_loaded[k], v), k  # encoder tensors equal the checkpoint's
    dec0 = {k: v.clone() for k, v in t.unwrapped_network.state_dict().items() if k.startswith("decoder.stages")}

    class Stop(Exception):
        pass

    orig = t.on_epoch_start

    def stop_at_epoch_1():
        if t.current_epoch == 1:
            raise Stop()
        orig()

    t.on_epoch_start = stop_at_epoch_1
    with pytest.raises(Stop):
        t.run_training()
    after_stage0 = _encoder(t)
    for k, v in enc0.items():
        assert torch.equal(after_stage0[k], v), f"encoder moved during the decoder-only stage: {k}"
    dec1 = t.unwrapped_network.state_dict()
    assert any(not torch.equal(dec1[k], v) for k, v in dec0.items()), "decoder did not train"
    assert os.path.isfile(os.path.join(t.output_folder, "pretrained_transfer.json"))
    latest = os.path.join(t.output_folder, "checkpoint_latest.pth")
    assert os.path.isfile(latest)

    # resume across the stage boundary
    t2 = _make(nnPreFineTuneTrainer, 41, continue_training=True)
    t2.configure_finetuning(pretrained=ckpt, schedule=sched, tag="test")

    def no_second_transfer(*a, **k):
        raise AssertionError("--c re-ran the encoder transfer")

    t2.transfer.apply = no_second_transfer
    assert maybe_resume(t2) == latest
    assert t2.transfer_record["loaded"] and t2.transfer_record["checkpoint"] == ckpt
    assert t2.current_epoch == 1 and t2.stage_index == 0
    t2.run_training()
    assert t2.stage_index == 1
    final = _encoder(t2)
    assert any(not torch.equal(final[k], v) for k, v in enc0.items()), "encoder never trained in stage 2"
    assert os.path.isfile(os.path.join(t2.output_folder, "checkpoint_final.pth"))


def test_from_scratch_and_few_labels(nnunet_root):
    from nnpre_testdata import write_raw_dataset

    from nnpre_trainers.finetune_trainer import nnPreFineTuneTrainer

    write_raw_dataset(nnunet_root, did=42, n_cases=3)
    plan_dataset(42, preset="cpu-tiny", num_processes=1)
    t = _make(nnPreFineTuneTrainer, 42)
    t.configure_finetuning(from_scratch=True, num_train_cases=2)
    t.num_epochs = 1
    t.initialize()
    # cpu-tiny plans: the preset's short-run optimizer (AdamW, scratch peak 3e-3); gpu plans keep SGD 1e-2
    from nnpre.presets import get_preset

    tiny = get_preset("cpu-tiny")
    assert t.schedule.base_lr == pytest.approx(tiny.finetune_lr[0]) and len(t.schedule.stages) == 1
    assert t.schedule.optimizer == "adamw" and isinstance(t.optimizer, torch.optim.AdamW)
    assert get_preset("gpu").finetune_optimizer == "sgd" and get_preset("gpu").finetune_lr is None
    tr, _ = t.do_split()
    assert len(tr) == 2 and tr == sorted(tr)
    tr2, _ = t.do_split()
    assert tr == tr2  # deterministic
    untagged = os.path.join(os.path.dirname(os.path.dirname(t.output_folder)),
                            "nnPreFineTuneTrainer__nnPreResEncLPlans__3d_fullres")
    assert not os.path.exists(untagged)  # nnU-Net's empty default run folder is removed
    # the variant is in the plans identifier (nnU-Net's TRAINER__PLANS__CONFIG scheme, no suffix after CONFIG)
    assert t.output_folder.endswith(os.path.join("nnPreFineTuneTrainer__nnPreResEncLPlans_scratch_n2__3d_fullres",
                                                 "fold_all"))
    variant = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], "Dataset042_T",
                                          "nnPreResEncLPlans_scratch_n2.json")))
    base = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], "Dataset042_T", "nnPreResEncLPlans.json")))
    assert variant["plans_name"] == "nnPreResEncLPlans_scratch_n2"
    assert variant["nnpre_variant"] == {"base_plans": "nnPreResEncLPlans", "variant": "scratch_n2"}
    assert variant["configurations"] == base["configurations"]  # same data identifier: no new preprocessing
    assert t.my_init_kwargs["plans"]["plans_name"] == "nnPreResEncLPlans_scratch_n2"  # checkpoints' init_args


def test_pretrained_run_folder_tag():
    from nnpre_trainers.finetune_trainer import pretrained_tag

    run = "/r/Dataset502_P/nnPreTrainer_MAE__nnPreResEncLPlans__3d_fullres"
    assert pretrained_tag(run + "/fold_all/checkpoint_final.pth") == "nnPreTrainer_MAE"
    assert pretrained_tag("/tmp/x/openmind mae.pth") == "openmind_mae"
    assert pretrained_tag("/tmp/x/checkpoint_final.pth") == "checkpoint_final"


def test_same_seed_bit_identical_on_cpu(nnunet_root):
    """Two fine-tuning runs with the same seed give identical weights (loaders, augmentation and init seeded)."""
    import numpy as np
    from nnpre_testdata import write_raw_dataset

    from nnpre_trainers.finetune_trainer import nnPreFineTuneTrainer

    write_raw_dataset(nnunet_root, did=43, n_cases=3)
    plan_dataset(43, preset="cpu-tiny", num_processes=1)
    sds = []
    for run in range(2):
        np.random.seed(run)  # global RNG states differ between the runs and must not matter
        torch.manual_seed(run)
        t = _make(nnPreFineTuneTrainer, 43)
        t.num_epochs = 2
        t.num_iterations_per_epoch = 3
        t.configure_finetuning(from_scratch=True, tag=f"det{run}")
        t.seed = 7
        t.run_training()
        sds.append({k: v.clone() for k, v in t.unwrapped_network.state_dict().items()})
        assert t.stages.switches == [(0, 0)]  # one stage, one optimizer
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_variant_chosen_in_make_trainer_creates_only_its_own_run_folder(nnunet_root):
    """nnPre_train (and the study) build the trainer with the variant plans: the only run folder ever created
    is nnU-Net's <Trainer>__<plans>_<variant>__<config> (nothing created then moved: no DDP race), and tagging
    again with the same variant changes nothing; variants never stack and never contain '__'."""
    from nnpre_testdata import write_raw_dataset

    from nnpre_trainers.aliases import nnPreFineTuneTrainer
    from nnpre_trainers.run import make_trainer
    from nnpre_trainers.trainer import run_variant, variant_plans, variant_plans_name

    write_raw_dataset(nnunet_root, did=46, n_cases=3)
    plan_dataset(46, preset="cpu-tiny", num_processes=1)
    variant = run_variant("/x/openmind__mae.pth", num_train_cases=2)
    assert variant == "pt_openmind__mae_n2"
    t = make_trainer(nnPreFineTuneTrainer, 46, "nnPreResEncLPlans", fold="all", device="cpu", variant=variant)
    t.configure_finetuning(from_scratch=True, tag=variant)
    results = os.path.join(os.environ["nnUNet_results"], "Dataset046_T")
    assert os.listdir(results) == ["nnPreFineTuneTrainer__nnPreResEncLPlans_pt_openmind_mae_n2__3d_fullres"]
    assert t.plans_manager.plans_name == "nnPreResEncLPlans_pt_openmind_mae_n2"
    assert variant_plans(t.plans_manager.plans, "scratch")["plans_name"] == "nnPreResEncLPlans_scratch"  # no stacking
    assert variant_plans_name("nnPrePlans__mae", "pt_mae") == "nnPrePlans_mae_pt_mae"  # nnU-Net splits on '__'
