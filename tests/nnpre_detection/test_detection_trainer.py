"""Detection training (nnPre_train detect) and whole-case inference (nnPre_predict) on a tiny dataset."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnpre.errors import NnPreError


def test_flip_boxes_maps_back_exactly():
    from nnpre_detection.inference import flip_boxes
    from nnpre_detection.instances import boxes_from_instances

    rng = np.random.default_rng(0)
    shape = (9, 12, 7)
    inst = np.zeros(shape, dtype=np.int32)
    inst[1:4, 0:5, 2:3] = 1
    inst[6:9, 7:12, 0:7] = 2
    inst[rng.integers(0, 9), rng.integers(0, 12), rng.integers(0, 7)] = 3
    ref, _ = boxes_from_instances(inst)
    ref = torch.from_numpy(ref)
    for axes in [(0,), (1,), (2,), (0, 2), (0, 1, 2)]:
        flipped, _ = boxes_from_instances(np.flip(inst, axes).copy())
        back = flip_boxes(torch.from_numpy(flipped), axes, shape)
        assert torch.equal(back, ref), axes
        assert torch.equal(flip_boxes(back, axes, shape), torch.from_numpy(flipped))  # involution


def test_targets_from_seg_boxes_and_labels():
    from nnpre_detection.trainer import targets_from_seg

    seg = torch.zeros(2, 1, 8, 8, 8)
    seg[0, 0, 1:3, 1:3, 1:3] = 1
    seg[0, 0, 5:7, 5:8, 4:5] = 2
    seg[1, 0, 0, 0, 0] = -1  # nnU-Net padding marker -> background
    t = targets_from_seg(seg)
    assert t[0]["boxes"].tolist() == [[0, 0, 3, 3, 0, 3], [4, 4, 7, 8, 3, 5]]
    assert t[0]["labels"].tolist() == [0, 1]
    assert t[1]["boxes"].shape == (0, 6) and t[1]["labels"].shape == (0,) and t[1]["seg"].max() == 0


def test_detection_train_and_predict(nnunet_root, tmp_path):
    """Train 4 x 6 iterations, predict the training images: boxes land on the lesions (better than chance)."""
    torch.set_num_threads(1)
    from nnpre_testdata import write_raw_dataset

    from nnpre.cli.predict import main as predict_main
    from nnpre_detection.boxes import box_iou
    from nnpre_detection.inference import check_finite, predict_folder
    from nnpre_detection.instances import boxes_from_instances
    from nnpre_detection.metrics.io import read_prediction
    from nnpre_detection.trainer import nnPreDetectionTrainer
    from nnpre_trainers.run import make_trainer
    from planners.pipeline import plan_dataset

    raw = write_raw_dataset(nnunet_root, did=47, n_cases=3)
    r = plan_dataset(47, preset="cpu-tiny", num_processes=1)
    _check_map_back(raw, r.plans)
    _check_pretrained(r.plans, 47, tmp_path)
    t = make_trainer(nnPreDetectionTrainer, 47, "nnPreResEncLPlans", fold="all", device="cpu", epochs=4, iterations=6)
    t.num_val_iterations_per_epoch = 1
    t.show_progress = False
    t.configure_detection(tag="test", head_channels=16)
    t.seed = 0  # network initialisation and loaders (the trainer seeds them; no global RNG involved)
    t.run_training()
    final = os.path.join(t.output_folder, "checkpoint_final.pth")
    ck = torch.load(final, weights_only=True, map_location="cpu")
    assert ck["nnpre_detection"]["num_classes"] == 1 and ck["current_epoch"] == 4
    # anchors were fitted to the training boxes and stored for inference
    assert t.anchor_sizes is not None
    assert ck["nnpre_detection"]["anchor_sizes"][0] == [list(a) for a in t.anchor_sizes.sizes_per_level()[0]]
    losses = t.logger.local_logger.my_fantastic_logging
    assert len(losses["train_losses"]) == 4 and all(np.isfinite(losses["val_losses"]))
    assert losses["train_losses"][-1] < losses["train_losses"][0]

    out = tmp_path / "preds"
    images = os.path.join(raw, "imagesTr")
    assert predict_main(["-i", images, "-o", str(out), "-m", t.output_folder, "--device", "cpu",
                         "--save-instances", "--instance-min-score", "0"]) == 0
    written = sorted(str(out / f) for f in os.listdir(out) if f.endswith(".json"))
    for case in ("c000", "c001", "c002"):  # viewer instance maps share the input's geometry
        im = sitk.ReadImage(str(out / f"{case}_instances.nii.gz"))
        ref = sitk.ReadImage(os.path.join(images, f"{case}_0000.nii.gz"))
        assert im.GetSize() == ref.GetSize() and np.allclose(im.GetSpacing(), ref.GetSpacing())
        assert np.allclose(im.GetOrigin(), ref.GetOrigin())
    assert sorted(os.path.basename(p) for p in written) == ["c000.json", "c001.json", "c002.json"]
    top_iou, chance_iou = [], []
    rng = np.random.default_rng(0)
    for p in written:
        with open(p) as f:
            d = json.load(f)
        assert {"case", "boxes", "scores", "labels", "boxes_world", "spacing", "origin", "direction"} <= set(d)
        pred = read_prediction(p)
        n = pred["boxes"].shape[0]
        assert pred["boxes"].shape == (n, 6) and pred["scores"].shape == (n,) and len(d["boxes_world"]) == n
        shape = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(images, d["case"] + "_0000.nii.gz"))).shape
        b = pred["boxes"]
        if n:
            assert (b[:, [0, 1, 4]] <= b[:, [2, 3, 5]]).all()
            assert (b[:, [0, 1, 4]] >= 0).all() and (b[:, [2, 3, 5]] <= np.array(shape)).all()
            w = np.asarray(d["boxes_world"])
            assert (w[:, :3] <= w[:, 3:]).all()
            lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "labelsTr", d["case"] + ".nii.gz")))
            gt = torch.from_numpy(boxes_from_instances(lab.astype(np.int32))[0])
            top = torch.from_numpy(b[:1])
            top_iou.append(float(box_iou(top, gt).max()))
            # chance: the same box at uniformly random positions inside the image
            size = (top[0, [2, 3, 5]] - top[0, [0, 1, 4]]).numpy()
            lo = rng.uniform(0, np.maximum(np.array(shape) - size, 1e-3), size=(200, 3))
            rand = torch.from_numpy(np.stack([lo[:, 0], lo[:, 1], lo[:, 0] + size[0], lo[:, 1] + size[1],
                                              lo[:, 2], lo[:, 2] + size[2]], 1)).float()
            chance_iou.append(float(box_iou(rand, gt)[:, 0].mean()))
        assert np.allclose(d["spacing"], (0.8, 0.8, 2.5))
    assert len(top_iou) == 3
    # after 24 iterations the top box has IoU ~0.7 with the lesion; random placement gives ~0.12
    assert np.median(top_iou) > max(0.4, np.median(chance_iou) + 0.2), (top_iou, chance_iou)

    # the CLI: wrong channel count -> one-line error, exit status 2
    bad = tmp_path / "bad"
    bad.mkdir()
    im = sitk.ReadImage(os.path.join(images, "c000_0000.nii.gz"))
    sitk.WriteImage(im, str(bad / "c000_0000.nii.gz"))
    sitk.WriteImage(im, str(bad / "c000_0001.nii.gz"))
    with pytest.raises(SystemExit) as e:
        predict_main(["-i", str(bad), "-o", str(tmp_path / "o2"), "-m", t.output_folder, "--device", "cpu"])
    assert e.value.code == 2
    with pytest.raises(NnPreError, match="channels"):
        predict_folder(t.output_folder, str(bad), str(tmp_path / "o2"), progress=False)

    # NaNs -> error naming the file (MHA keeps NaNs; ITK's NIfTI reader maps them to 0)
    arr = sitk.GetArrayFromImage(im)
    arr[0, 0, 0] = np.nan
    nan_file = str(tmp_path / "c009_0000.mha")
    sitk.WriteImage(sitk.GetImageFromArray(arr), nan_file)
    with pytest.raises(NnPreError, match="c009_0000.mha"):
        check_finite([nan_file])


def _check_map_back(raw, plans):
    """Boxes of the preprocessed (cropped + resampled) label map back onto the original label's boxes."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnpre_detection.inference import boxes_to_world, to_original_index
    from nnpre_detection.instances import boxes_from_instances

    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    with open(os.path.join(raw, "dataset.json")) as f:
        dj = json.load(f)
    img, lab = os.path.join(raw, "imagesTr", "c000_0000.nii.gz"), os.path.join(raw, "labelsTr", "c000.nii.gz")
    data, seg, props = cm.preprocessor_class(verbose=False).run_case([img], lab, pm, cm, dj)
    pre_box, _ = boxes_from_instances((seg[0] > 0).astype(np.int32))
    assert pre_box.shape == (1, 6)
    back = to_original_index(pre_box, data.shape[1:], props)
    ref_img = sitk.ReadImage(lab)
    ref_box, _ = boxes_from_instances(sitk.GetArrayFromImage(ref_img).astype(np.int32))
    spacing_zyx = np.array(ref_img.GetSpacing()[::-1])
    err_mm = np.abs(back - ref_box) * spacing_zyx[[0, 1, 0, 1, 2, 2]]
    assert err_mm.max() <= 2.0 + 1e-6, (back, ref_box)  # within one target voxel (2 mm)
    # world boxes: identity direction, zero origin -> index * spacing, axes (x, y, z) = array (2, 1, 0)
    w = boxes_to_world(ref_box, ref_img)[0]
    sx, sy, sz = ref_img.GetSpacing()
    assert np.allclose(w, [ref_box[0, 4] * sx, ref_box[0, 1] * sy, ref_box[0, 0] * sz,
                           ref_box[0, 5] * sx, ref_box[0, 3] * sy, ref_box[0, 2] * sz])


def _check_pretrained(plans, did, tmp_path):
    """Pretrained encoder is loaded exactly; the DKFZ schedule starts with a decoder + heads only stage."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnpre.adaptation_plan import from_nnunet_plans
    from nnpre_detection.trainer import nnPreDetectionTrainer
    from nnpre_trainers.run import make_trainer

    a = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(3)
    unet = get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], 1, 1,
                                  allow_init=True, deep_supervision=False)
    ckpt = str(tmp_path / "pre.pth")
    plan = from_nnunet_plans(plans, "3d_fullres", 1, pretext="mae", pretext_config={})
    torch.save({"network_weights": unet.state_dict(), "nnssl_adaptation_plan": plan.to_dict()}, ckpt)
    t = make_trainer(nnPreDetectionTrainer, did, "nnPreResEncLPlans", fold="all", device="cpu", epochs=20,
                     iterations=5)
    t.configure_detection(pretrained=ckpt, tag="pt")
    t.initialize()
    sd = t.unwrapped_network.state_dict()
    enc = {k: v for k, v in unet.state_dict().items() if k.startswith("encoder.")}
    assert enc and all(torch.equal(sd[k], v) for k, v in enc.items())
    assert os.path.isfile(os.path.join(t.output_folder, "pretrained_transfer.json"))
    assert [s.name for s in t.schedule.stages] == ["decoder_warmup", "whole_network"]
    trained = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for n, p in t.unwrapped_network.named_parameters() if n.startswith("encoder."))
    assert any(id(p) in trained for n, p in t.unwrapped_network.named_parameters() if n.startswith("classifier."))


def test_detection_same_seed_bit_identical_on_cpu(nnunet_root):
    from nnpre_testdata import write_raw_dataset

    from nnpre_detection.trainer import nnPreDetectionTrainer
    from nnpre_trainers.run import make_trainer
    from planners.pipeline import plan_dataset

    write_raw_dataset(nnunet_root, did=48, n_cases=3)
    plan_dataset(48, preset="cpu-tiny", num_processes=1)
    sds = []
    for run in range(2):
        np.random.seed(run)
        torch.manual_seed(run)
        t = make_trainer(nnPreDetectionTrainer, 48, "nnPreResEncLPlans", fold="all", device="cpu", epochs=2,
                         iterations=3)
        t.num_val_iterations_per_epoch = 1
        t.show_progress = False
        t.configure_detection(tag=f"det{run}", head_channels=8)
        t.seed = 3
        t.run_training()
        sds.append({k: v.clone() for k, v in t.unwrapped_network.state_dict().items()})
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


class _Stop(Exception):
    pass


def test_detection_recipe_schedule_swa_and_best_metric_resume(nnunet_root, monkeypatch):
    """nnPre_train detect trains nnDetection's recipe (tiny: 3 main epochs of 2 iterations, warm-up 3, 2 SWA
    epochs): the LR of every step is ``DetectionRecipe.lr_at``, SGD 0.9 with no weight decay on norms, no
    clipping, the recipe's oversampling in the loaders, checkpoint_final = the mean of the SWA snapshots;
    interrupted mid-warm-up, mid-poly and mid-SWA and resumed with --c (maybe_resume), and checkpoint_best (by the
    monitored metric, scripted per epoch) is not replaced by a worse epoch after a resume."""
    torch.set_num_threads(1)
    from nnpre_testdata import write_raw_dataset

    import nnpre_trainers.trainer as trainer_mod
    from nnpre_detection.recipe import NNDET_V001
    from nnpre_detection.task import DetectionTask
    from nnpre_detection.trainer import nnPreDetectionTrainer
    from nnpre_trainers.run import make_trainer, maybe_resume
    from planners.pipeline import plan_dataset

    write_raw_dataset(nnunet_root, did=49, n_cases=3)
    plan_dataset(49, preset="cpu-tiny", num_processes=1)

    # default lengths: the preset's recipe (cpu-tiny overrides) or nnDetection's (gpu), fitted to --epochs
    t = make_trainer(nnPreDetectionTrainer, 49, "nnPreResEncLPlans", fold="all", device="cpu")
    length = lambda t: (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch, t.save_every)  # noqa
    assert length(t) == (4, 10, 2, 1)
    t = make_trainer(nnPreDetectionTrainer, 49, "nnPreResEncLPlans", fold="all", device="cpu", preset="gpu")
    assert length(t) == (60, 2500, 100, 5)
    t.configure_detection()
    assert t.task.default_schedule(t) == NNDET_V001.schedule() and t.task.foreground_oversampling(t) == 0.5
    t = make_trainer(nnPreDetectionTrainer, 49, "nnPreResEncLPlans", fold="all", device="cpu", preset="gpu",
                     epochs=6, iterations=10)
    t.configure_detection()
    assert t.task.default_schedule(t) == NNDET_V001.fitted(6, 10).schedule()

    recipe = NNDET_V001.replace(num_epochs=3, iterations_per_epoch=2, warm_iterations=3, swa_epochs=2,
                                val_iterations_per_epoch=1, oversample_foreground_percent=0.7)
    script = [0.1, 0.5, 0.2, 0.3, 0.4]  # monitored validation metric per epoch: best = epoch 1

    class ScriptedTask(DetectionTask):
        def on_validation_epoch_end(self, trainer, outputs):
            super().on_validation_epoch_end(trainer, outputs)  # the real patch evaluation runs
            self.val_metric = script[trainer.current_epoch]

    seen = {"lr": {}, "clip": set(), "snap": {}, "oversample": [], "opt": []}
    real_step, real_loader = trainer_mod.train_step, trainer_mod.nnUNetDataLoader
    holder = {}

    def spy(network, optimizer, fn, device, scaler, clip, **kw):
        it = holder["t"].global_iteration
        seen["lr"][it] = [g["lr"] for g in optimizer.param_groups]
        seen["clip"].add(clip)
        seen["opt"].append((type(optimizer).__name__, [(g["momentum"], g["nesterov"], g["weight_decay"])
                                                       for g in optimizer.param_groups]))
        if it in (6, 8):  # SWA epoch starts: the weights before the step are the snapshot
            seen["snap"][it] = {k: v.detach().clone() for k, v in holder["t"].unwrapped_network.named_parameters()}
        if it == holder.get("stop"):
            raise _Stop()
        return real_step(network, optimizer, fn, device, scaler, clip, **kw)

    class SpyLoader(real_loader):
        def __init__(self, *a, **kw):
            seen["oversample"].append(kw["oversample_foreground_percent"])
            super().__init__(*a, **kw)

    monkeypatch.setattr(trainer_mod, "train_step", spy)
    monkeypatch.setattr(trainer_mod, "nnUNetDataLoader", SpyLoader)

    def run(stop, resume):
        t = make_trainer(nnPreDetectionTrainer, 49, "nnPreResEncLPlans", fold="all", device="cpu", epochs=5,
                         iterations=2, continue_training=resume)
        t.num_val_iterations_per_epoch, t.save_every, t.show_progress = 1, 1, False
        t.configure_finetuning(from_scratch=True, tag="recipe", task=ScriptedTask(
            training_recipe=recipe, plan_anchors=False, head_channels=8))
        t.seed = 0
        if resume:
            assert maybe_resume(t).endswith("checkpoint_latest.pth")
        holder.update(t=t, stop=stop)
        try:
            t.run_training()
        except _Stop:
            return t, False
        return t, True

    for stop, resume in ((2, False), (4, True), (8, True)):  # mid-warm-up, mid-poly, mid-SWA
        t, done = run(stop, resume)
        assert not done
        latest = trainer_mod.safe_load(os.path.join(t.output_folder, "checkpoint_latest.pth"))
        assert latest["current_epoch"] == stop // 2
    latest = trainer_mod.safe_load(os.path.join(t.output_folder, "checkpoint_latest.pth"))
    assert latest["nnpre_stages"]["average"]["n"] == 1  # the SWA average travels in the checkpoint
    t, done = run(None, True)
    assert done and t.current_epoch == 5

    assert sorted(seen["lr"]) == list(range(10))
    for it, lrs in seen["lr"].items():
        assert lrs == pytest.approx([recipe.lr_at(it)] * 2, rel=1e-12), it
    assert seen["clip"] == {None}
    assert {o for o, _ in seen["opt"]} == {"SGD"} and all(g == [(0.9, True, 3e-5), (0.9, True, 0.0)]
                                                          for _, g in seen["opt"])
    assert seen["oversample"] and set(seen["oversample"]) == {0.7} and t.oversample_foreground_percent == 0.7

    final = torch.load(os.path.join(t.output_folder, "checkpoint_final.pth"), weights_only=True)
    snaps = seen["snap"]
    assert not all(torch.equal(snaps[6][k], snaps[8][k]) for k in snaps[6])
    for k, v in snaps[6].items():
        assert torch.allclose(final["network_weights"][k], (v + snaps[8][k]) / 2, atol=1e-6), k
    assert final["nnpre_run"]["schedule"]["stages"][-1]["name"] == "swa"

    best = torch.load(os.path.join(t.output_folder, "checkpoint_best.pth"), weights_only=True)
    assert best["current_epoch"] == 2 and best["nnpre_best"]["value"] == 0.5
    assert best["nnpre_best"]["key"] == recipe.monitor_key and final["nnpre_best"]["epoch"] == 1
