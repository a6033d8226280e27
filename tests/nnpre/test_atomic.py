"""``nnpre.atomic``: all-or-nothing writes whose files get the mode the umask allows (not mkstemp's 0600)."""
import os
import stat

import pytest

from nnpre.atomic import current_umask, write_json, write_with


@pytest.fixture
def umask():
    def set_mask(mask):
        old = os.umask(mask)
        restore.append(old)
        return mask

    restore = []
    yield set_mask
    for old in reversed(restore):
        os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o027, 0o640)])
def test_written_files_respect_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    write_json({"a": 1}, tmp_path / "plans.json")
    write_with(lambda p: open(p, "w").write("x"), tmp_path / "sub" / "ckpt.pth")
    for p in (tmp_path / "plans.json", tmp_path / "sub" / "ckpt.pth"):
        assert stat.S_IMODE(os.stat(p).st_mode) == mode, oct(os.stat(p).st_mode)
    # a plain open() would have given the same mode
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    assert stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == mode


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.json"
    write_json({"v": 1}, target)

    def broken(p):
        open(p, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_with(broken, target)
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert sorted(os.listdir(tmp_path)) == ["x.json"]
