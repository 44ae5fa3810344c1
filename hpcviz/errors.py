"""One exception base for hpcviz; each error class carries the exit code a command ends with.

- `InputError` (a `ValueError`): the request does not fit (a bad option, a missing file, a run that
  is busy or holds something else). Exit 2; the command changed nothing.
- `JobError` (a `RuntimeError`): a job or stage ran and failed. Exit 1.
- `DiskFullError` (an `OSError`): a write did not fit on its file system. Exit 1; the previous file
  is left whole (every write goes to a temp file first).
- `Interrupted`: Ctrl-C. Exit 130.

Every module's own errors subclass one of these, so `hpcviz.commands.command` maps any of them to
one `error:` line and its exit code.
"""
from __future__ import annotations


class HpcvizError(Exception):
    """The base of every hpcviz error."""
    exit_code = 1


class InputError(HpcvizError, ValueError):
    """Bad input: what was given, what is valid and a hint, in one line."""
    exit_code = 2


class JobError(HpcvizError, RuntimeError):
    """A job or stage that ran and failed."""
    exit_code = 1


class DiskFullError(HpcvizError, OSError):
    """A write that does not fit on its file system (the message names the path and the space)."""
    exit_code = 1


class Interrupted(HpcvizError):
    """Ctrl-C: what was submitted keeps running."""
    exit_code = 130


def exit_code(error: BaseException) -> int:
    """The exit code a command ends with for `error`: its class's, 2 for any other ValueError, else 1."""
    if isinstance(error, HpcvizError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return Interrupted.exit_code
    return 2 if isinstance(error, ValueError) else 1
