"""Pretraining trainer on an image-only pool: every task runs, safe checkpoints, resume, stock CLI (DDP: test_ddp)."""
import os
import subprocess
import sys

import pytest
import torch

from planners.pipeline import plan_dataset

TASKS = ["mae", "mg", "diffusion"]


@pytest.fixture
def pool(nnunet_root):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=51, n_cases=3, labelled=False, channels=1)
    r = plan_dataset(51, preset="cpu-tiny", num_processes=1)
    assert not r.labelled
    return r


def _trainer(task, epochs, iterations, seed=0, resume=False):
    from nnpre_trainers.aliases import PRETRAIN_TRAINERS
    from nnpre_trainers.run import make_trainer

    torch.manual_seed(seed)
    t = make_trainer(PRETRAIN_TRAINERS[task], 51, "nnPreResEncLPlans", fold="all", device="cpu",
                     continue_training=resume, epochs=epochs, iterations=iterations)
    t.num_val_iterations_per_epoch = 1
    t.save_every = 1
    t.seed = seed
    t.show_progress = False
    return t


@pytest.mark.parametrize("task", TASKS)
def test_every_task_trains_and_writes_safe_checkpoint(pool, task):
    t = _trainer(task, epochs=1, iterations=2)
    t.run_training()
    ck_path = os.path.join(t.output_folder, "checkpoint_final.pth")
    ck = torch.load(ck_path, weights_only=True, map_location="cpu")  # no allow-list needed
    plan = ck["nnssl_adaptation_plan"]
    assert plan["key_to_encoder"] == "encoder.stages" and plan["key_to_stem"] == "encoder.stem"
    assert plan["pretrain_num_input_channels"] == 1
    cfg = next(iter(plan["pretrain_plan"]["configurations"].values()))
    assert cfg["spacing"] == [2.0, 2.0, 2.0] and cfg["patch_size"] == [32, 32, 32]
    assert plan["nnpre"]["pretext"] == t.pretext.name
    # conditioning modules (diffusion) live outside encoder.* keys
    enc_keys = [k for k in ck["network_weights"] if k.startswith("encoder.")]
    assert not any("nnpre_conditioning" in k for k in enc_keys)
    assert os.path.isfile(os.path.join(t.output_folder, "progress_pretrain.png"))
    assert os.listdir(os.path.join(t.output_folder, "previews"))


def test_mae_loss_decreases(pool):
    t = _trainer("mae", epochs=6, iterations=6, seed=3)
    t.initial_lr = 1e-2
    t.run_training()
    losses = t.logger.local_logger.my_fantastic_logging["train_losses"]
    assert losses[-1] < 0.9 * losses[0], losses


def test_same_seed_same_weights(pool):
    sds = []
    for _ in range(2):
        t = _trainer("mg", epochs=1, iterations=3, seed=7)
        t.overwrite = True  # the second run replaces the first, finished one
        t.run_training()
        sds.append({k: v.clone() for k, v in t.unwrapped_network.state_dict().items()})
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_resume_after_kill(pool):
    from nnpre_trainers.run import maybe_resume

    t = _trainer("mae", epochs=3, iterations=2)
    orig = t.on_epoch_start

    def die():
        if t.current_epoch == 2:
            raise KeyboardInterrupt
        orig()

    t.on_epoch_start = die
    with pytest.raises(KeyboardInterrupt):
        t.run_training()
    latest = os.path.join(t.output_folder, "checkpoint_latest.pth")
    assert os.path.isfile(latest)
    assert not [f for f in os.listdir(t.output_folder) if f.startswith(".tmp_")]  # no half-written files
    t2 = _trainer("mae", epochs=3, iterations=2, resume=True)
    assert maybe_resume(t2) == latest and t2.current_epoch == 2
    assert len(t2.optimizer.state_dict()["state"]) > 0  # momentum buffers restored
    t2.run_training()
    assert len(t2.logger.local_logger.my_fantastic_logging["train_losses"]) == 3


def test_stock_nnunetv2_train_finds_our_trainer(pool):
    import nnpre_trainers

    env = dict(os.environ, nnUNet_extTrainer=nnpre_trainers.EXT_TRAINER_DIR, nnUNet_n_proc_DA="0")
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    out = subprocess.run([exe, "51", "3d_fullres", "all", "-p", "nnPreResEncLPlans", "-tr", "nnPreTrainer_MG",
                          "-device", "cpu"], env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-3000:]
    folder = os.path.join(os.environ["nnUNet_results"], "Dataset051_T",
                          "nnPreTrainer_MG__nnPreResEncLPlans__3d_fullres", "fold_all")
    assert os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))


def test_unknown_task_is_a_clear_error(pool, capsys):
    from nnpre.cli.train import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain", "-d", "51", "-t", "simclr"])
    assert e.value.code == 2 and "unknown pretext task 'simclr'" in capsys.readouterr().err
