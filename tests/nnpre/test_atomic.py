"""``nnpre.atomic``: all-or-nothing writes whose files get the mode the umask allows (not mkstemp's 0600)."""
import os
import stat

import pytest

from nnpre.atomic import current_umask, read_json, write_json, write_with
from nnpre.errors import NnPreError


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


def test_read_json_parses_and_names_file_and_role_on_failure(tmp_path):
    """read_json: write_json's reading side; unreadable / invalid / non-UTF-8 files stop with one line."""
    good = tmp_path / "good.json"
    good.write_text('{"boxes": [[0, 0, 1, 1, 0, 1]], "x": "\\u00e9"}', encoding="utf-8")
    assert read_json(str(good)) == {"boxes": [[0, 0, 1, 1, 0, 1]], "x": "é"}
    bad = tmp_path / "bad.json"
    bad.write_text('{"boxes": [', encoding="utf-8")
    with pytest.raises(NnPreError) as e:
        read_json(str(bad), "ignore JSON")
    assert str(e.value).startswith(f"{bad}: cannot read ignore JSON (JSONDecodeError: ") and "\n" not in str(e.value)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"name": "\xe9"}')  # not UTF-8
    with pytest.raises(NnPreError, match=r"cannot read JSON \(UnicodeDecodeError"):
        read_json(str(latin))
    with pytest.raises(NnPreError, match=r"missing.json: cannot read JSON \(FileNotFoundError"):
        read_json(str(tmp_path / "missing.json"))
