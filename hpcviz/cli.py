"""The command layer's plumbing: parsers derived from the config dataclasses, and one wrapper that turns
every hpcviz error into a single `error:` line and its exit code (2 bad input, 1 failed, 130 interrupted).

Each option is defined once, as a field of a config (`hpcviz.config.option`); `add_options` makes it a
command-line option with that field's default, help and unit, and `given` reads back the options
that were given (None = not given, so recipes and profiles can fill the rest).
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import gc
import re
import sys
import typing
from collections.abc import Callable, Collection
from typing import Any

from .config import flag_of
from .errors import DiskFullError, HpcvizError, Interrupted, exit_code
from .files import disk_full, is_disk_full


class Parser(argparse.ArgumentParser):
    """argparse with our error line: `error: --epochs invalid int value: 'x'; hint: ...`, exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        m = re.fullmatch(r"argument (--[\w-]+)(?:/\S+)?: (.*)", message, re.S)
        text = f"{m.group(1)} {m.group(2)}" if m else message
        hint = "" if "hint:" in text else f"; hint: {self.prog} --help lists the options"
        print(f"error: {text}{hint}", file=sys.stderr)
        raise SystemExit(2)


def names(value: str) -> list[str]:
    """A comma-separated list; 'none' is the empty list."""
    return [] if value.strip() == "none" else [v.strip() for v in value.split(",") if v.strip()]


def ints(value: str) -> list[int]:
    try:
        return [int(v) for v in names(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: not comma-separated integers; hint: e.g. 3,17,42") from None


def _dest(f: dataclasses.Field, prefix: str) -> str:
    """The argparse dest of a field's option: its flag's name (--report-images -> report_images), so that
    two configs' fields of one name on one command line never collide."""
    return flag_of(f, prefix)[2:].replace("-", "_")


def _fields(cls: type, only: Collection[str] | None, skip: Collection[str]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.name not in skip
            and (only is None or f.name in only)]


def _default_text(f: dataclasses.Field) -> str:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default in (None, "", []) or isinstance(default, bool):
        return ""
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    unit = f" {f.metadata['unit']}" if f.metadata.get("unit") else ""
    return f" (default {shown}{unit})"


def add_options(parser: argparse.ArgumentParser, cls: type, *, title: str = "", prefix: str = "",
                only: Collection[str] | None = None, skip: Collection[str] = (),
                required: Collection[str] = ()) -> None:
    """One option per field of the config dataclass `cls` (see config.option): its flag, help, default and
    unit. Every default is None on the parser, so `given` tells a given option from one that was not."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title) if title else parser
    for f in _fields(cls, only, skip):
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text = f"{' | '.join(c or repr(c) for c in f.metadata['choices'])}: {help_text}"
        kw: dict[str, Any] = dict(dest=_dest(f, prefix), default=None, help=help_text + _default_text(f))
        kind = hints[f.name]
        if f.metadata.get("const") is not None:  # the flag alone means `const` (--resume: auto)
            kw.update(nargs="?", const=f.metadata["const"])
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if kind is bool:
            kw["action"] = "store_false" if f.default is True else "store_true"
            if f.default is True:  # the field's help says what the default does; the flag turns it off
                assert flag_of(f, prefix).startswith("--no-"), f"{f.name}: a default-on switch needs a --no- flag"
                kw["help"] = f"turn off: {help_text}"
        elif kind == list[int]:
            kw.update(type=ints, metavar="I,J,...")
        elif kind == list[str]:
            kw.update(type=names, metavar="A,B,...")
        else:
            kw["type"] = next(t for t in (int, float, str) if kind in (t, t | None))
            if f.metadata.get("unit") and "metavar" not in kw:
                kw["metavar"] = f.metadata["unit"].split()[0].upper()
        group.add_argument(flag_of(f, prefix), required=f.name in required, **kw)


def given(args: argparse.Namespace, cls: type, prefix: str = "", only: Collection[str] | None = None,
          skip: Collection[str] = ()) -> dict[str, Any]:
    """{field: value} of the options of `cls` that were given on the command line."""
    out = {}
    for f in _fields(cls, only, skip):
        value = getattr(args, _dest(f, prefix), None)
        if value is not None:
            out[f.name] = value
    return out


def print_error(error: BaseException) -> None:
    """`error: <first line>`; further lines (a job's log tail) follow, indented."""
    first, *rest = str(error).strip().splitlines() or [type(error).__name__]
    print(f"error: {first}", file=sys.stderr)
    for line in rest:
        print(f"  {line}", file=sys.stderr)


# At exit the interpreter's last collections walk every object torch and torchvision made at import: 0.65 s of
# every command on 2 cores (a tenth of a small local run's overhead). Frozen first, they are skipped; what they
# hold is the process's to the end anyway.
atexit.register(gc.freeze)


def command(main: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command's main: every hpcviz error (and a full disk) is one `error:` line and its exit code,
    Ctrl-C is 130. Anything else is a bug and keeps its traceback."""
    @functools.wraps(main)
    def run(args: argparse.Namespace) -> int:
        try:
            return main(args)
        except KeyboardInterrupt:
            print_error(Interrupted("interrupted; what was submitted keeps running"))
            return Interrupted.exit_code
        except HpcvizError as e:
            print_error(e)
            return e.exit_code
        except OSError as e:  # not ours: name the path and what went wrong, without a traceback
            error: BaseException = e
            if is_disk_full(e):
                error = disk_full(e.filename or "?")
            elif not isinstance(e, DiskFullError):
                error = HpcvizError(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}; hint: "
                                    "check that path (permissions, a file system that went away)")
            print_error(error)
            return exit_code(error)
    return run
