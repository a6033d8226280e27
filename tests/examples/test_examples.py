"""The copy-paste scripts in examples/, run in-process on tiny data (1 epoch x 2 iterations, cpu-tiny)."""
import csv
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
TINY = ["--preset", "cpu-tiny", "--epochs", "1", "--iterations", "2", "--device", "cpu"]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"nnpre_example_{name}", os.path.join(EXAMPLES, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _quiet_and_deterministic():
    torch.set_num_threads(1)
    np.random.seed(0)  # nnU-Net's data loader draws from the global numpy RNG


def _expect_error(main, argv, capsys, *fragments):
    capsys.readouterr()  # drop earlier output
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err  # one line, no traceback
    for f in fragments:
        assert f in err[0], (f, err[0])


def test_every_example_documents_its_usage():
    for name in ("pretrain_own_folder", "finetune_from_nnssl", "detection_nndet_format", "predict_challenge"):
        mod = load_example(name)
        assert "Usage::" in mod.__doc__ and f"examples/{name}.py" in mod.__doc__
        assert "--root" in mod.build_parser().format_help()


def test_pretrain_own_folder_then_finetune_from_nnssl(nnunet_root, tmp_path, capsys):
    from nnpre_testdata import write_raw_dataset

    pretrain = load_example("pretrain_own_folder")
    finetune = load_example("finetune_from_nnssl")
    root = str(nnunet_root)

    # a user's folder: plain file names, no dataset.json
    labelled = write_raw_dataset(nnunet_root, did=31, n_cases=3)
    scans = tmp_path / "my_scans"
    scans.mkdir()
    for i, f in enumerate(sorted(os.listdir(os.path.join(labelled, "imagesTr")))):
        shutil.copy(os.path.join(labelled, "imagesTr", f), scans / f"patient{i}.nii.gz")
    encoder = str(tmp_path / "mae_encoder.pth")
    with open(encoder, "w") as f:
        f.write("an earlier export")
    _expect_error(pretrain.main, ["-i", str(scans), "-d", "30", "--root", root, "--export", encoder, *TINY], capsys,
                  f"--export {encoder} already exists", "--overwrite")
    assert not os.path.exists(os.path.join(root, "nnUNet_raw", "Dataset030_my_scans"))  # refused before any work
    assert pretrain.main(["-i", str(scans), "-d", "30", "--root", root, "-np", "1", "--export", encoder,
                          "--overwrite", *TINY]) == 0
    out = capsys.readouterr().out

    raw = os.path.join(root, "nnUNet_raw", "Dataset030_my_scans")
    dj = json.load(open(os.path.join(raw, "dataset.json")))
    assert dj["numTraining"] == 3 and dj["labels"] == {"background": 0} and dj["channel_names"] == {"0": "CT"}
    assert sorted(os.listdir(os.path.join(raw, "imagesTr"))) == [f"patient{i}_0000.nii.gz" for i in range(3)]
    pre = os.path.join(root, "nnUNet_preprocessed", "Dataset030_my_scans")
    assert os.path.isfile(os.path.join(pre, "nnPreResEncLPlans.json"))
    run = os.path.join(root, "nnUNet_results", "Dataset030_my_scans",
                       "nnPreTrainer_MAE__nnPreResEncLPlans__3d_fullres", "fold_all")
    ckpt = os.path.join(run, "checkpoint_final.pth")
    assert f"pretrained checkpoint: {ckpt}" in out
    assert torch.load(ckpt, weights_only=True, map_location="cpu")["current_epoch"] == 1
    enc = torch.load(encoder, weights_only=True, map_location="cpu")
    assert set(enc) >= {"network_weights", "nnssl_adaptation_plan"}  # nnssl / OpenMind layout
    assert enc["network_weights"] and all(k.startswith(("encoder.", "stem.")) or ".stem." in k
                                          for k in enc["network_weights"])

    # fine-tune the labelled dataset from the nnssl-format file
    assert finetune.main(["-d", "31", "--pretrained", encoder, "--root", root, "-f", "all", "-np", "1",
                          "--no-validation", *TINY]) == 0  # nnU-Net's validation alone takes ~25 s here
    out = capsys.readouterr().out
    ft_run = os.path.join(root, "nnUNet_results", "Dataset031_T",
                          "nnPreFineTuneTrainer__nnPrePlans_mae_encoder_pt_mae_encoder__3d_fullres", "fold_all")
    report = os.path.join(ft_run, "pretrained_transfer.json")
    rep = json.load(open(report))
    assert f"transfer report: {report} ({len(rep['loaded'])} keys loaded" in out
    assert len(rep["loaded"]) > 10 and all(k.startswith("encoder.") for k in rep["loaded"])
    assert rep["missing"] and not rep["remapped"]  # decoder left at init, same channel count
    plans = json.load(open(os.path.join(root, "nnUNet_preprocessed", "Dataset031_T",
                                        "nnPrePlans__mae_encoder.json")))  # --like names the plans after the file
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["features_per_stage"] == enc["nnssl_adaptation_plan"]["architecture_plans"]["arch_kwargs"][
        "features_per_stage"]  # planned --like the checkpoint
    assert os.path.isfile(os.path.join(ft_run, "checkpoint_final.pth"))
    assert f"run folder: {ft_run}" in out and not os.path.isdir(os.path.join(ft_run, "validation"))

    # bad input: one error line naming the problem
    _expect_error(finetune.main, ["-d", "31", "--pretrained", str(tmp_path / "missing.pth"), "--root", root],
                  capsys, "missing.pth does not exist")
    _expect_error(pretrain.main, ["-i", str(scans), "-d", "30", "--name", "Other", "--root", root, *TINY], capsys,
                  "dataset id 30 already exists")
    (tmp_path / "empty").mkdir()
    _expect_error(pretrain.main, ["-i", str(tmp_path / "empty"), "-d", "32", "--root", root], capsys,
                  "holds no images")


def test_detection_nndet_format_then_predict_challenge(nnunet_root, tmp_path, capsys):
    from nnpre.synthetic import get_synth_config, write_nndet_dataset

    detection = load_example("detection_nndet_format")
    challenge = load_example("predict_challenge")
    root = str(nnunet_root)
    task = write_nndet_dataset(str(tmp_path / "nndet"), 77, "TinyLuna", n_train=2, n_test=2, seed=0,
                               config=get_synth_config("easy", fov_mm=48.0))
    out_dir = str(tmp_path / "det_out")
    assert detection.main(["--task-dir", task, "--root", root, "-f", "all", "--no-mirror", "-np", "1",
                           "--out", out_dir, *TINY]) == 0
    out = capsys.readouterr().out

    raw = os.path.join(root, "nnUNet_raw", "Dataset077_TinyLuna")
    dj = json.load(open(os.path.join(raw, "dataset.json")))
    assert dj["labels"] == {"background": 0, "lesion": 1} and dj["numTraining"] == 2
    inst = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(task, "raw_splitted", "labelsTr", "train_0000.nii.gz")))
    sem = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "labelsTr", "train_0000.nii.gz")))
    assert inst.max() >= 1 and np.array_equal(sem, (inst > 0).astype(np.uint8))  # class 0 -> label 1
    model = os.path.join(root, "nnUNet_results", "Dataset077_TinyLuna",
                         "nnPreDetectionTrainer__nnPreResEncLPlans_scratch__3d_fullres", "fold_all")
    assert f"model: {model}" in out
    ck = torch.load(os.path.join(model, "checkpoint_final.pth"), weights_only=True, map_location="cpu")
    assert ck["current_epoch"] == 1 and ck["nnpre_detection"]["num_classes"] == 1
    assert sorted(os.listdir(os.path.join(out_dir, "boxes"))) == ["test_0000.json", "test_0001.json"]
    metrics = json.load(open(os.path.join(out_dir, "detection_metrics.json")))
    assert metrics["info"]["num_cases"] == 2
    assert metrics["ground_truth_folder"] == os.path.join(task, "raw_splitted", "labelsTs")  # original instances
    n_gt = sum(len(json.load(open(os.path.join(task, "raw_splitted", "labelsTs", f)))["instances"])
               for f in ("test_0000.json", "test_0001.json"))
    assert metrics["info"]["num_gt"] == n_gt > 0
    assert "AP_IoU_0.10_MaxDet_100" in out and "FROC_score_IoU_0.10" in metrics["metrics"]

    # challenge submission from plain-named .mha scans (converted to the model's .nii.gz on the fly)
    scans = tmp_path / "challenge_scans"
    scans.mkdir()
    uids = {}
    for k in range(2):
        uid = f"1.3.6.1.4.1.{k}"
        im = sitk.ReadImage(os.path.join(task, "raw_splitted", "imagesTs", f"test_{k:04d}_0000.nii.gz"))
        clean = sitk.GetImageFromArray(sitk.GetArrayFromImage(im))  # without the NIfTI header's metadata
        clean.CopyInformation(im)
        sitk.WriteImage(clean, str(scans / f"{uid}.mha"))
        uids[uid] = clean
    pred = str(tmp_path / "challenge_pred")
    assert challenge.main(["-m", model, "-i", str(scans), "-o", pred, "--no-mirror", "--device", "cpu"]) == 0
    assert sorted(f for f in os.listdir(pred) if not f.startswith(".")) == sorted(
        [f"{u}.json" for u in uids] + ["submission.csv"])
    assert not [f for f in os.listdir(pred) if f.startswith(".")]  # staging folder removed
    with open(os.path.join(pred, "submission.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    preds = {u: json.load(open(os.path.join(pred, f"{u}.json"))) for u in uids}
    assert len(rows) - 1 == sum(len(p["scores"]) for p in preds.values()) > 0  # untrained: many candidates
    for uid, im in uids.items():
        got = np.array([[float(v) for v in r[1:]] for r in rows[1:] if r[0] == uid]).reshape(-1, 4)
        d = preds[uid]
        assert np.all(np.diff(got[:, 3]) <= 0)  # sorted by probability
        order = np.argsort(-np.asarray(d["scores"]), kind="stable")
        w = np.asarray(d["boxes_world"]).reshape(-1, 6)[order]
        assert np.allclose(got[:, :3], (w[:, :3] + w[:, 3:]) / 2, atol=2e-3)
        assert np.allclose(got[:, 3], np.asarray(d["scores"])[order], atol=2e-6)
        assert np.all((got[:, 3] >= 0) & (got[:, 3] <= 1))
        # the centres are the index-space box centres mapped through the ORIGINAL scan's geometry (origin far
        # from 0): the .mha -> .nii.gz staging kept the physical space
        b = np.asarray(d["boxes"]).reshape(-1, 6)[order]
        centre_idx = np.stack([(b[:, 4] + b[:, 5]) / 2, (b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2], 1)
        phys = np.array([im.TransformContinuousIndexToPhysicalPoint([float(v) for v in c]) for c in centre_idx])
        assert np.allclose(got[:, :3], phys.reshape(-1, 3), atol=2e-2)

    # --min-score filters rows (CSV writer on the same JSONs)
    csv2 = str(tmp_path / "filtered.csv")
    files = [os.path.join(pred, f"{u}.json") for u in uids]
    all_scores = [s for p in preds.values() for s in p["scores"]]
    cut = float(np.median(all_scores)) if all_scores else 0.5
    n = challenge.write_submission(files, csv2, min_score=cut)
    assert n == sum(s >= cut for s in all_scores) and len(open(csv2).read().strip().splitlines()) == n + 1

    # the Grand Challenge container entry point on a job folder laid out as the platform mounts it
    from nnpre.cli import challenge as gc_cli

    uid = next(iter(uids))
    job, job_out = tmp_path / "job", tmp_path / "job_out"
    (job / "images" / "ct").mkdir(parents=True)
    shutil.copy(scans / f"{uid}.mha", job / "images" / "ct" / "a1b2c3.mha")
    assert gc_cli.main(["-m", model, "--input", str(job), "--output", str(job_out), "--no-mirror",
                        "--device", "cpu", "--segmentation-slug", "lesion-instances"]) == 0
    gc = json.load(open(job_out / "lesion-bounding-boxes.json"))
    assert gc["type"] == "Multiple 3D bounding boxes" and gc["version"] == {"major": 1, "minor": 0}
    assert len(gc["boxes"]) == len(preds[uid]["scores"]) > 0
    probs = [b["probability"] for b in gc["boxes"]]
    assert probs == sorted(probs, reverse=True)
    order = np.argsort(-np.asarray(preds[uid]["scores"]), kind="stable")
    world = np.asarray(preds[uid]["boxes_world"]).reshape(-1, 6)[order]
    corners = np.asarray([b["corners"] for b in gc["boxes"]])  # (N, 8, 3) mm
    assert corners.shape == (len(probs), 8, 3)
    assert np.allclose(corners.min(1), world[:, :3], atol=1e-3) and np.allclose(corners.max(1), world[:, 3:], atol=1e-3)
    seg = sitk.ReadImage(str(job_out / "images" / "lesion-instances" / "output.mha"))
    ref = uids[uid]
    assert seg.GetSize() == ref.GetSize() and np.allclose(seg.GetOrigin(), ref.GetOrigin())
    assert sorted(os.listdir(job_out)) == ["images", "lesion-bounding-boxes.json"]  # no staging left behind
    _expect_error(gc_cli.main, ["-m", model, "--input", str(tmp_path / "nojob"), "--output", str(job_out)], capsys,
                  "nojob does not exist")
    (job / "images" / "pet").mkdir()
    _expect_error(gc_cli.main, ["-m", model, "--input", str(job), "--output", str(job_out), "--device", "cpu"],
                  capsys, "expected exactly one image for input 'pet'")
    _expect_error(gc_cli.main, ["-m", model, "--input", str(job), "--output", str(job_out), "--device", "cpu",
                                "--channels", "ct,ct"], capsys, "expects 1 input channel(s)")

    # bad input: one error line naming the file
    _expect_error(challenge.main, ["-m", str(tmp_path / "nomodel"), "-i", str(scans), "-o", pred], capsys,
                  "nomodel does not exist")
    (scans / "broken.mha").write_bytes(b"junk")
    _expect_error(challenge.main, ["-m", model, "-i", str(scans), "-o", pred, "--device", "cpu"], capsys,
                  "broken.mha")
    _expect_error(detection.main, ["--task-dir", str(tmp_path / "Task078_Missing"), "--root", root], capsys,
                  "Task078_Missing does not exist")
