"""Adapters inside the trainer and the CLIs: ``nnPre_train finetune --adapter``, adapter.json, frozen encoder
bit-identical over a real fine-tuning run, ``--c`` with the adapter, ``nnPre_export --full`` merging, and the
merged checkpoint in nnU-Net's stock predictor."""
import glob
import os
import shutil

import numpy as np
import pytest
import torch
from nnpre_testdata import write_pretrained_checkpoint

from planners.pipeline import plan_dataset


def _plain_network(plans, num_outputs=2):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    a = plans["configurations"]["3d_fullres"]["architecture"]
    return get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], 1,
                                  num_outputs, allow_init=True, deep_supervision=False)


def _run(main, argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _adapted_key(sd, k):
    """Key of the original tensor ``k`` in an adapted state dict (``...conv.weight`` → ``...conv.base.weight``)."""
    if k in sd:
        return k
    head, leaf = k.rsplit(".", 1)
    return f"{head}.base.{leaf}"


@pytest.mark.slow
def test_lora_finetune_cli_resume_export_and_stock_predictor(nnunet_root, tmp_path, monkeypatch, capsys):
    from nnpre_testdata import write_raw_dataset

    import nnpre_trainers
    from nnpre.checkpoints import safe_load
    from nnpre.cli.export import main as export_main
    from nnpre.cli.train import main as train_main
    from nnpre_trainers.adapters import get_adapter

    write_raw_dataset(nnunet_root, did=43, n_cases=3)
    r = plan_dataset(43, preset="cpu-tiny", num_processes=1)
    ckpt = str(tmp_path / "pre.pth")
    enc0 = write_pretrained_checkpoint(r.plans, ckpt)
    base = ["finetune", "-d", "43", "-f", "all", "--pretrained", ckpt, "--device", "cpu", "--iterations", "3",
            "--no-validation", "--adapter", "lora", "--lora-rank", "2", "--lora-alpha", "4"]
    assert _run(train_main, base + ["--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "adapter lora (rank=2, alpha=4.0" in out and "parameters trainable" in out
    folders = glob.glob(os.path.join(os.environ["nnUNet_results"], "Dataset043_T",
                                     "nnPreFineTuneTrainer__nnPreResEncLPlans_pt_pre_lora__3d_fullres", "fold_all"))
    assert len(folders) == 1, folders
    folder = folders[0]
    import json

    info = json.load(open(os.path.join(folder, "adapter.json")))
    assert info["adapter"] == "lora" and 0 < info["added"] < info["trainable"] < info["total"]

    final = os.path.join(folder, "checkpoint_final.pth")
    ck = safe_load(final)  # weights_only=True
    assert ck["nnpre_run"]["adapter"] == {"name": "lora", "options": {"rank": 2, "alpha": 4.0, "layers": r"^encoder\."}}
    sd = ck["network_weights"]
    assert any(".lora_A." in k for k in sd)
    for k, v in enc0.items():
        assert torch.equal(sd[_adapted_key(sd, k)], v), f"frozen encoder tensor changed: {k}"
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if ".lora_B." in k), "LoRA B never trained"

    # --c with a different adapter configuration: one line, nothing trained
    assert _run(train_main, base[:-4] + ["--lora-rank", "4", "--c", "--epochs", "3"]) == 2
    assert "was trained with adapter lora" in capsys.readouterr().err
    # --c with the same adapter continues the run (3 epochs now), encoder still bit-identical
    assert _run(train_main, base + ["--c", "--epochs", "3"]) == 0
    ck = safe_load(final)
    assert ck["current_epoch"] == 3
    sd = ck["network_weights"]
    for k, v in enc0.items():
        assert torch.equal(sd[_adapted_key(sd, k)], v), f"frozen encoder tensor changed after --c: {k}"

    # export: merged plain weights, equal outputs
    merged_path = str(tmp_path / "merged.pth")
    assert _run(export_main, [final, "-o", merged_path, "--full"]) == 0
    merged = safe_load(merged_path)
    plain = _plain_network(r.plans)
    assert list(merged["network_weights"]) == list(plain.state_dict())
    assert "optimizer_state" not in merged and merged["nnpre_run"]["adapter"] is None
    plain.load_state_dict(merged["network_weights"])
    adapted = _plain_network(r.plans)
    get_adapter("lora", rank=2, alpha=4.0).apply(adapted)
    adapted.load_state_dict(sd)
    x = torch.randn(1, 1, *r.plans["configurations"]["3d_fullres"]["patch_size"])
    with torch.no_grad():
        assert (plain.eval()(x) - adapted.eval()(x)).abs().max() < 1e-5

    # nnU-Net's stock predictor (what nnUNetv2_predict runs) on a copy of the run folder with the merged checkpoint
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model = tmp_path / "model"
    os.makedirs(model / "fold_all")
    for f in ("plans.json", "dataset.json"):
        shutil.copy(os.path.join(os.path.dirname(folder), f), model / f)
    shutil.copy(merged_path, model / "fold_all" / "checkpoint_final.pth")
    monkeypatch.setenv("nnUNet_extTrainer", nnpre_trainers.EXT_TRAINER_DIR)
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=torch.device("cpu"),
                           verbose=False, allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(model), use_folds=("all",), checkpoint_name="checkpoint_final.pth")
    img = np.random.default_rng(0).normal(size=(1, 20, 48, 48)).astype(np.float32)
    seg = pred.predict_single_npy_array(img, {"spacing": [2.5, 0.8, 0.8]}, None, None, False)
    assert seg.shape == (20, 48, 48)


@pytest.mark.slow
def test_probe_finetune_trains_heads_only(nnunet_root, tmp_path):
    from nnpre_testdata import write_raw_dataset

    from nnpre.checkpoints import safe_load
    from nnpre_trainers.adapters import get_adapter
    from nnpre_trainers.aliases import nnPreFineTuneTrainer
    from nnpre_trainers.run import make_trainer

    write_raw_dataset(nnunet_root, did=44, n_cases=3)
    r = plan_dataset(44, preset="cpu-tiny", num_processes=1)
    ckpt = str(tmp_path / "pre.pth")
    enc0 = write_pretrained_checkpoint(r.plans, ckpt)
    t = make_trainer(nnPreFineTuneTrainer, 44, "nnPreResEncLPlans", fold="all", device="cpu", epochs=2, iterations=3)
    t.num_val_iterations_per_epoch = 1
    t.show_progress = False
    t.configure_finetuning(pretrained=ckpt, adapter=get_adapter("probe-linear"))
    assert "nnPreResEncLPlans_pt_pre_probe-linear__3d_fullres" in t.output_folder  # adapter runs: own run folder
    t.initialize()
    heads0 = {k: v.clone() for k, v in t.unwrapped_network.state_dict().items() if k.startswith("decoder.heads.")}
    assert heads0 and not any(k.startswith("decoder.stages") for k in t.unwrapped_network.state_dict())
    opt_params = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in t.unwrapped_network.named_parameters()}
    assert opt_params and all(names[i].startswith("decoder.heads.") for i in opt_params)
    t.run_training()
    ck = safe_load(os.path.join(t.output_folder, "checkpoint_final.pth"))
    sd = ck["network_weights"]
    for k, v in enc0.items():
        assert torch.equal(sd[k], v), f"frozen encoder tensor changed: {k}"
    assert any(not torch.equal(sd[k], v) for k, v in heads0.items()), "probe heads did not train"
    t.perform_actual_validation(False)  # nnU-Net's sliding-window validation runs the probe network as it is
    assert os.path.isfile(os.path.join(t.output_folder, "validation", "summary.json"))


@pytest.mark.slow
def test_lora_detection_encoder_frozen_and_merged_export_predicts(nnunet_root, tmp_path):
    torch.set_num_threads(1)
    from nnpre_testdata import write_raw_dataset

    from nnpre.checkpoints import safe_load
    from nnpre.cli.export import main as export_main
    from nnpre.cli.predict import main as predict_main
    from nnpre_trainers.adapters import get_adapter
    from nnpre_trainers.aliases import nnPreDetectionTrainer
    from nnpre_trainers.run import make_trainer

    raw = write_raw_dataset(nnunet_root, did=45, n_cases=3)
    r = plan_dataset(45, preset="cpu-tiny", num_processes=1)
    ckpt = str(tmp_path / "pre.pth")
    enc0 = write_pretrained_checkpoint(r.plans, ckpt)
    t = make_trainer(nnPreDetectionTrainer, 45, "nnPreResEncLPlans", fold="all", device="cpu", epochs=2, iterations=3)
    t.num_val_iterations_per_epoch = 1
    t.show_progress = False
    t.configure_detection(pretrained=ckpt, head_channels=16, adapter=get_adapter("lora", rank=2))
    assert "nnPreResEncLPlans_pt_pre_lora__3d_fullres" in t.output_folder
    t.run_training()
    final = os.path.join(t.output_folder, "checkpoint_final.pth")
    sd = safe_load(final)["network_weights"]
    for k, v in enc0.items():
        assert torch.equal(sd[_adapted_key(sd, k)], v), f"frozen encoder tensor changed: {k}"
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if ".lora_B." in k), "LoRA B never trained"

    # nnPre_predict applies the recorded adapter to the unmerged checkpoint; same boxes as the merged export below
    unmerged_out = tmp_path / "preds_unmerged"
    assert predict_main(["-i", os.path.join(raw, "imagesTr"), "-o", str(unmerged_out), "-m", t.output_folder,
                         "--device", "cpu"]) == 0

    merged_dir = tmp_path / "merged_run"
    shutil.copytree(os.path.dirname(t.output_folder), merged_dir)
    merged_final = str(merged_dir / os.path.basename(t.output_folder) / "checkpoint_final.pth")
    os.remove(merged_final)  # the copy of the unmerged checkpoint: replaced by the merged one
    assert _run(export_main, [final, "-o", merged_final, "--full"]) == 0
    merged = safe_load(merged_final)["network_weights"]
    assert not any(".lora_" in k or ".base." in k for k in merged)
    assert set(merged) == set(sd) - {k for k in sd if ".lora_" in k} - {k for k in sd if ".base." in k} | \
        {k.replace(".base.", ".") for k in sd if ".base." in k}
    out = tmp_path / "preds"
    assert predict_main(["-i", os.path.join(raw, "imagesTr"), "-o", str(out), "-m",
                         str(merged_dir / os.path.basename(t.output_folder)), "--device", "cpu"]) == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".json")) == ["c000.json", "c001.json", "c002.json"]
    import json

    for f in ("c000.json", "c001.json", "c002.json"):
        a, b = json.load(open(out / f)), json.load(open(unmerged_out / f))
        assert len(a["boxes"]) == len(b["boxes"]), f  # merged LoRA = base + B·A: same model up to rounding
        assert np.allclose(sorted(a["scores"]), sorted(b["scores"]), atol=1e-4), f
