"""Stock nnU-Net accepts nnPre plans as they are: nnUNetv2_preprocess and nnUNetTrainer (tiny, CPU)."""
import json
import os
import subprocess
import sys

import torch

from planners.pipeline import plan_dataset


def test_stock_preprocess_and_trainer_run_on_our_plans(nnunet_root):
    from nnpre_testdata import write_raw_dataset
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    write_raw_dataset(nnunet_root, did=21, n_cases=4, spacing=(0.9, 0.9, 2.0))
    r = plan_dataset(21, preset="cpu-tiny", preprocess=False, num_processes=1)
    # the stock preprocessing command, unchanged
    env = dict(os.environ)
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_preprocess"), "-d", "21",
                          "-plans_name", r.plans_identifier, "-c", "3d_fullres", "-np", "1"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    folder = os.path.join(os.environ["nnUNet_preprocessed"], r.dataset_name, "nnPreResEncLPlans_3d_fullres")
    assert len([f for f in os.listdir(folder) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd")]) == 4

    # the stock trainer, a few iterations on CPU
    plans = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], r.dataset_name, "nnPreResEncLPlans.json")))
    plans["continue_training"] = False
    dj = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], r.dataset_name, "dataset.json")))
    torch.manual_seed(0)
    t = nnUNetTrainer(plans=plans, configuration="3d_fullres", fold="all", dataset_json=dj, device=torch.device("cpu"))
    t.num_iterations_per_epoch = 3
    t.num_val_iterations_per_epoch = 1
    t.num_epochs = 1
    t.run_training()
    assert os.path.isfile(os.path.join(t.output_folder, "checkpoint_final.pth"))
    losses = t.logger.local_logger.my_fantastic_logging["train_losses"]
    assert len(losses) == 1 and losses[0] == losses[0]  # finite, logged
    assert tuple(t.configuration_manager.patch_size) == (32, 32, 32)
