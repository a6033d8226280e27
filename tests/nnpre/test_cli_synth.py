"""Tests for ``nnPre_synth``."""
import json
import os

import pytest


def test_cli_smoke_and_missing_output(tmp_path, monkeypatch, capsys):
    from nnpre.cli.synth import main

    out, det = str(tmp_path / "raw"), str(tmp_path / "det")
    main(["--out", out, "-d", "41", "--n-train", "2", "--n-test", "1", "--n-pool", "1", "--pool-channels", "2",
          "--fov", "48", "--seed", "4", "--lung-label", "--nndet-out", det])
    printed = capsys.readouterr().out.split()
    assert printed == [os.path.join(out, "Dataset041_SynthLesions"), os.path.join(det, "Task041_SynthLesions"),
                       os.path.join(out, "Dataset042_SynthPool")]
    assert json.load(open(os.path.join(printed[0], "dataset.json")))["labels"]["lung"] == 2
    assert len(os.listdir(os.path.join(printed[2], "imagesTr"))) == 2
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--n-train", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nnUNet_raw" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # a different seed into the same folder is refused
        main(["--out", out, "-d", "41", "--n-train", "2", "--n-test", "1", "--n-pool", "0", "--fov", "48"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
