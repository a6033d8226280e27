"""User-facing errors.

Every problem a user can fix (bad input file, missing environment variable, wrong dataset id, ...)
is raised as :class:`NnPreError` with a one-line message that names the offending file and the fix.
The command-line entry points catch it, print ``error: <message>`` and exit with status 2 instead of
showing a traceback.
"""


class NnPreError(RuntimeError):
    """An error the user can fix; its message is one line naming the file and the remedy."""


def fail(message: str) -> "NoReturn":  # noqa: F821 - typing only
    """Raise :class:`NnPreError` with ``message`` (kept to a single line)."""
    raise NnPreError(" ".join(str(message).split("\n")))
