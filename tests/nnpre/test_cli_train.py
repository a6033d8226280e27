"""nnPre_train on bad input and unsafe situations: one-line errors (exit 2), finished runs kept, locks, leftovers,
workers that die with a killed trainer."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from planners.pipeline import plan_dataset

COMMON = ["--device", "cpu", "--epochs", "1", "--iterations", "1"]


@pytest.fixture
def labelled(nnunet_root):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=61, n_cases=3)
    plan_dataset(61, preset="cpu-tiny", num_processes=1)
    return nnunet_root


def _run(argv, capsys):
    from nnpre.cli.train import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
    (["--iterations", "0"], "--iterations must be >= 1, got 0"),
    (["-f", "abc"], "-f expects a fold number"),
    (["-f", "-3"], "-f expects a fold number >= 0"),
    (["-f", "7"], "fold 7 does not exist"),
    (["-f", "0"], "has only 3 preprocessed cases; train with -f all"),
])
def test_bad_arguments_are_one_line_errors(labelled, capsys, argv, message):
    code, err = _run(["finetune", "-d", "61", "--from-scratch", *COMMON, *argv], capsys)
    assert code == 2 and message in err and err.count("\n") == 0 and err.startswith("error: "), err


def test_splits_must_match_the_dataset(labelled, capsys):
    splits = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset061_T", "splits_final.json")
    for bad in ([{"train": ["c000", "c001"], "val": ["c009"]}],  # names a case the dataset lacks
                [{"train": ["c000"], "val": ["c001"]}]):  # c002 in no split
        with open(splits, "w") as f:
            json.dump(bad, f)
        code, err = _run(["finetune", "-d", "61", "--from-scratch", "-f", "0", *COMMON], capsys)
        assert code == 2 and "splits_final.json" in err and err.count("\n") == 0, err


def test_image_only_pool_cannot_be_fine_tuned(nnunet_root, capsys):
    from nnpre_testdata import write_raw_dataset

    write_raw_dataset(nnunet_root, did=62, n_cases=3, labelled=False)
    plan_dataset(62, preset="cpu-tiny", num_processes=1)
    code, err = _run(["finetune", "-d", "62", "--from-scratch", "-f", "all", *COMMON], capsys)
    assert code == 2 and "has no labels (an image-only pool)" in err, err


def test_finished_run_is_kept_lock_and_leftovers(labelled, capsys):
    from nnpre.cli.train import main
    from nnpre_trainers.run_folder import RunLock

    argv = ["pretrain", "-d", "61", "-t", "mae", "-f", "all", *COMMON]
    assert main(argv) == 0
    folder = os.path.join(os.environ["nnUNet_results"], "Dataset061_T",
                          "nnPreTrainer_MAE__nnPreResEncLPlans__3d_fullres", "fold_all")
    final = os.path.join(folder, "checkpoint_final.pth")
    before = open(final, "rb").read()
    # a new run (even with --epochs -1) never replaces a finished one without --overwrite
    code, err = _run(argv, capsys)
    assert code == 2 and "--overwrite" in err and "checkpoint_final.pth exists" in err, err
    code, err = _run(argv[:-4] + ["--epochs", "-1", "--iterations", "1"], capsys)
    assert code == 2 and open(final, "rb").read() == before
    # --c on a finished run: says so, exit 0, nothing written
    capsys.readouterr()
    assert main(argv + ["--c"]) == 0
    assert "already finished" in capsys.readouterr().out and open(final, "rb").read() == before
    # a second run into a folder another run holds: refused
    lock = RunLock(folder).acquire()
    try:
        code, err = _run(argv + ["--overwrite"], capsys)
        assert code == 2 and "another training run (pid" in err, err
    finally:
        lock.release()
    # --overwrite trains again; an interrupted write's empty temp file is removed
    tmp = os.path.join(folder, ".tmp_checkpoint_latest_abc.pth")
    open(tmp, "wb").close()
    assert main(argv + ["--overwrite"]) == 0
    assert not os.path.exists(tmp) and open(final, "rb").read() != before


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except FileNotFoundError:
        return []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_loader_workers_die_with_a_killed_trainer(labelled):
    env = dict(os.environ, nnUNet_n_proc_DA="2", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "nnpre.cli.train", "finetune", "-d", "61", "--from-scratch", "-f", "all",
           "--device", "cpu", "--epochs", "50", "--iterations", "50"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers = []
        for _ in range(600):
            workers = _children(p.pid)
            if len(workers) >= 3:
                break
            time.sleep(0.2)
        assert len(workers) >= 3, "the trainer never started its loader workers"
        time.sleep(1.0)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], "loader workers outlived the killed trainer"
    finally:
        if p.poll() is None:
            p.kill()


def test_cpu_tiny_voco_crops_the_plans_patch_and_explicit_set_wins(labelled, capsys):
    """cpu-tiny's pretext override (VoCo region_size None = the plans' 32³ patch instead of nnssl's 256×256×64,
    188 s and 5 GB per iteration on 2 cores) applies through nnPre_train pretrain; --set wins; gpu keeps nnssl's."""
    from nnpre.checkpoints import safe_load
    from nnpre.cli.train import main
    from nnpre_trainers.aliases import pretrain_trainer
    from nnpre_trainers.run import make_trainer

    t0 = time.time()
    assert main(["pretrain", "-d", "61", "-t", "voco", "-f", "all", *COMMON]) == 0
    assert time.time() - t0 < 120
    final = os.path.join(os.environ["nnUNet_results"], "Dataset061_T",
                         "nnPreTrainer_VOCO__nnPreResEncLPlans__3d_fullres", "fold_all", "checkpoint_final.pth")
    from nnpre.adaptation_plan import NNPRE_EXTRAS_KEY

    recorded = safe_load(final)["nnssl_adaptation_plan"][NNPRE_EXTRAS_KEY]["pretext_config"]
    assert recorded["region_size"] is None, recorded

    t = make_trainer(pretrain_trainer("voco"), 61, device="cpu")
    assert t.default_task().pretext.config.region_size is None  # the plans' preset (cpu-tiny)
    t.set_pretext("voco", region_size=[64, 64, 32])
    assert tuple(t.pretext.config.region_size) == (64, 64, 32)  # explicit --set wins
    g = make_trainer(pretrain_trainer("voco"), 61, device="cpu", preset="gpu")
    assert tuple(g.default_task().pretext.config.region_size) == (256, 256, 64)  # faithful default untouched


def test_detect_ends_with_the_post_processing_sweep(nnunet_root):
    """nnPre_train detect writes the sweep's inference_plan.json into the fold folder (what nnPre_predict reads);
    --no-validation skips it."""
    import glob

    from nnpre_testdata import write_raw_dataset

    from nnpre.cli.train import main

    write_raw_dataset(nnunet_root, did=62, n_cases=5)  # 5 cases: nnU-Net's 5-fold split, 1 validation case
    plan_dataset(62, preset="cpu-tiny", num_processes=1)
    argv = ["detect", "-d", "62", "-f", "0", *COMMON]
    assert main(argv + ["--no-validation"]) == 0
    (fold,) = glob.glob(os.path.join(os.environ["nnUNet_results"], "Dataset062_*",
                                     "nnPreDetectionTrainer__*__3d_fullres", "fold_0"))
    plan_file = os.path.join(fold, "inference_plan.json")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth")) and not os.path.exists(plan_file)
    assert main(argv + ["--overwrite"]) == 0
    with open(plan_file) as f:
        plan = json.load(f)
    assert {"model_iou", "ensemble_iou", "model_score_thresh"} <= set(plan), plan
