"""User-facing errors.

Every problem a user can fix (bad input file, missing environment variable, wrong dataset id, ...)
is raised as :class:`NnPreError` with a one-line message that names the offending file and the fix.
The command-line entry points catch it, print ``error: <message>`` and exit with status 2 instead of
showing a traceback.
"""


import errno

#: ``OSError`` numbers the command-line entry points turn into one ``error:`` line (the user can fix them).
USER_OS_ERRORS = {errno.EACCES: "check the permissions of the file and its folder, or choose another path",
                  errno.EPERM: "check the permissions of the file and its folder, or choose another path",
                  errno.EROFS: "the file system is read-only; choose a path on a writable one",
                  errno.EEXIST: "remove it or choose another path",
                  errno.ENOSPC: "the disk is full; free space or choose another path",
                  errno.EDQUOT: "the disk quota is exceeded; free space or choose another path",
                  errno.EISDIR: "it is a folder; give a file path",
                  errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path"}


class NnPreError(RuntimeError):
    """An error the user can fix; its message is one line naming the file and the remedy."""


def fail(message: str) -> "NoReturn":  # noqa: F821 - typing only
    """Raise :class:`NnPreError` with ``message`` (kept to a single line)."""
    raise NnPreError(" ".join(str(message).split("\n")))


def os_error_message(e: OSError) -> str | None:
    """One line for an ``OSError`` the user can fix (see :data:`USER_OS_ERRORS`), else None (a real bug)."""
    fix = USER_OS_ERRORS.get(getattr(e, "errno", None))
    if fix is None:
        return None
    where = e.filename if e.filename is not None else "?"
    if getattr(e, "filename2", None):
        where = f"{where} -> {e.filename2}"
    return f"{where}: {e.strerror or type(e).__name__}; {fix}"


def checkpoint_folder_hint(folder: str, option: str = "--pretrained") -> str:
    """One line for a folder given where a checkpoint file is expected, naming the checkpoint files found inside
    (an nnU-Net run keeps them in ``fold_X/checkpoint_final.pth``; searched two levels deep, final first)."""
    import glob
    import os

    found = []
    for depth in ("*.pth", os.path.join("*", "*.pth"), os.path.join("*", "*", "*.pth")):
        found += sorted(glob.glob(os.path.join(folder, depth)))
    found = [p for p in found if not os.path.basename(p).startswith(".")]
    found.sort(key=lambda p: (os.path.basename(p) != "checkpoint_final.pth", p.count(os.sep), p))
    if found:
        more = f" (or one of {len(found) - 1} other .pth file(s) there)" if len(found) > 1 else ""
        return f"{option} {folder} is a folder, not a checkpoint file; pass the file, e.g. {found[0]}{more}"
    return (f"{option} {folder} is a folder without any .pth checkpoint; pass the checkpoint file itself (an nnU-Net "
            f"run keeps it in fold_X/checkpoint_final.pth)")
