"""Atomic file writes: write to a temporary file in the same folder, then ``os.replace``.

A reader (or a crash) therefore sees either the old complete file or the new complete file, never a
truncated one. Used for plans, checkpoints, predictions and reports.

``tempfile.mkstemp`` creates its file with mode 0600; before the rename the file gets the mode a plain
``open(path, "w")`` would have given it (``0o666 & ~umask``), so plans, checkpoints and predictions stay
readable by the group / other users of a shared cluster exactly as the user's umask says.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Callable, Iterable, Iterator

from nnpre.errors import fail


def current_umask() -> int:
    """The process umask: from ``/proc/self/status`` on Linux (no side effect, thread-safe), else by setting
    and restoring it (``os.umask`` has no getter)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def writable_folder(folder: str, option: str = "-o") -> None:
    """Fail with one line unless ``folder`` (or, if it does not exist yet, its nearest existing parent) can be
    written; checked before long work so a read-only target does not end in a PermissionError traceback."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        fail(f"{option} {folder}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(f"{option} {folder}: folder {probe} is not writable (permission denied); choose another path or fix "
             f"its permissions (chmod u+w)")


def check_output_file(output: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                      option: str = "-o") -> str:
    """Refuse an output file that is one of the ``inputs``, an existing file (unless ``overwrite``), a folder, or
    in a folder that cannot be written. Returns the path. Call before any work is done."""
    output = os.fspath(output)
    for src in inputs:
        src = os.fspath(src)
        if os.path.exists(src) and os.path.exists(output) and os.path.samefile(src, output):
            fail(f"{option} {output} is the input file {src}; writing it would replace the input. Choose another "
                 f"output file")
    if os.path.isdir(output):
        fail(f"{option} {output} is a folder; give the path of a file (inside it, or elsewhere)")
    if os.path.lexists(output) and not overwrite:
        fail(f"{option} {output} already exists; pass --overwrite to replace it or choose another file")
    writable_folder(os.path.dirname(os.path.abspath(output)), option)
    return output


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    The temporary name keeps the file's suffix(es) so that writers that dispatch on the
    extension (SimpleITK, matplotlib) still work.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    suffix = base[base.find("."):] if "." in base else ""
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + base.split(".")[0] + "_", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # flush file contents to disk before the rename
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 -> what the umask allows
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> None:
    """Atomically write ``obj`` as JSON (numpy scalars/arrays are converted)."""

    def default(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        if hasattr(o, "item"):
            return o.item()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, default=default)


def read_json(path: str | os.PathLike, what: str = "JSON") -> Any:
    """The parsed content of the UTF-8 JSON file ``path`` (the reading side of :func:`write_json`).

    An unreadable file or invalid JSON stops with one line ``<path>: cannot read <what> (<error>)``; ``what``
    names the file's role, e.g. ``"prediction JSON"``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        fail(f"{path}: cannot read {what} ({type(e).__name__}: {e})")


def write_with(writer: Callable[[str], None], path: str | os.PathLike) -> None:
    """Atomically produce ``path`` with ``writer(tmp_path)`` (e.g. ``torch.save``, ``sitk.WriteImage``)."""
    with atomic_path(path) as tmp:
        writer(tmp)
