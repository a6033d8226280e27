"""Stock nnU-Net accepts nnPre plans as they are: nnUNetv2_preprocess and nnUNetTrainer (tiny, CPU)."""
import json
import os
import subprocess
import sys

import torch
from nnpre_testdata import write_pretrained_checkpoint

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


def _stock(cmd, *args):
    """Run a stock nnU-Net console command of this environment (nnUNet_extTrainer finds nnpre's trainers)."""
    import nnpre_trainers

    env = dict(os.environ, nnUNet_extTrainer=nnpre_trainers.EXT_TRAINER_DIR, OMP_NUM_THREADS="1")
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), cmd), *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-3000:])
    return out.stdout


def test_stock_predict_and_find_best_configuration_find_our_runs(nnunet_root, tmp_path):
    """Fine-tuned (pretrained) and scratch runs of nnPre_train sit in nnU-Net's TRAINER__PLANS__CONFIG folders
    (the variant is in the plans identifier), so the stock nnUNetv2_predict -tr/-p/-f and
    nnUNetv2_find_best_configuration find and use them."""
    import shutil

    from nnpre_testdata import write_raw_dataset
    from nnunetv2.utilities.file_path_utilities import parse_dataset_trainer_plans_configuration_from_path

    from nnpre.cli.train import main as train_main

    torch.set_num_threads(1)
    raw = write_raw_dataset(nnunet_root, did=23, n_cases=5)
    r = plan_dataset(23, preset="cpu-tiny", num_processes=1)
    ckpt = str(tmp_path / "mae.pth")
    write_pretrained_checkpoint(r.plans, ckpt)
    short = ["-d", "23", "-f", "0", "--epochs", "1", "--iterations", "2", "-device", "cpu"]
    assert train_main(["finetune", "--from-scratch", *short]) == 0
    assert train_main(["finetune", "--pretrained", ckpt, *short]) == 0
    results = os.path.join(os.environ["nnUNet_results"], r.dataset_name)
    runs = sorted(os.listdir(results))
    assert runs == ["nnPreFineTuneTrainer__nnPreResEncLPlans_pt_mae__3d_fullres",
                    "nnPreFineTuneTrainer__nnPreResEncLPlans_scratch__3d_fullres"], runs
    for run in runs:  # nnU-Net's own parser splits them into exactly (dataset, trainer, plans, configuration)
        ds, tr, pl, cfg = parse_dataset_trainer_plans_configuration_from_path(os.path.join(results, run, "fold_0"))
        assert (ds, tr, cfg) == (r.dataset_name, "nnPreFineTuneTrainer", "3d_fullres") and pl in run
        assert os.path.isfile(os.path.join(os.environ["nnUNet_preprocessed"], r.dataset_name, pl + ".json"))

    images = tmp_path / "imagesTs"
    images.mkdir()
    src = sorted(f for f in os.listdir(os.path.join(raw, "imagesTr")) if f.endswith(".nii.gz"))[0]
    shutil.copy(os.path.join(raw, "imagesTr", src), images / src)
    for plans in ("nnPreResEncLPlans_scratch", "nnPreResEncLPlans_pt_mae"):
        out = tmp_path / f"pred_{plans}"
        _stock("nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "23", "-c", "3d_fullres",
               "-tr", "nnPreFineTuneTrainer", "-p", plans, "-f", "0", "-device", "cpu", "--disable_tta",
               "-npp", "1", "-nps", "1")
        assert os.path.isfile(out / src.replace("_0000.nii.gz", ".nii.gz")), os.listdir(out)

    log = _stock("nnUNetv2_find_best_configuration", "23", "-c", "3d_fullres", "-tr", "nnPreFineTuneTrainer",
                 "-p", "nnPreResEncLPlans_scratch", "nnPreResEncLPlans_pt_mae", "-f", "0", "--disable_ensembling",
                 "-np", "1")
    assert "nnUNetv2_predict" in log
    info = json.load(open(os.path.join(results, "inference_information.json")))
    assert set(info["all_results"]) == {run for run in runs}
    best = info["best_model_or_ensemble"]["selected_model_or_models"][0]
    assert best["trainer"] == "nnPreFineTuneTrainer" and best["configuration"] == "3d_fullres"
    assert best["plans_identifier"] in ("nnPreResEncLPlans_scratch", "nnPreResEncLPlans_pt_mae")
