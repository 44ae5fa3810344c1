"""Writes that are never half done: a temp file beside the target, fsync, rename; and one clear line
when a file system is full (the path, the space needed, the space free), the previous file left whole.

Used by the store (HDF5), the checkpoints and the run directory, the only code that writes files.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import DiskFullError, InputError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the file system of `path` (or of its nearest
    existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def disk_full(path: str | os.PathLike, needed: int | None = None) -> DiskFullError:
    """The one-line error for a write of `needed` bytes (None: unknown) to `path` that does not fit."""
    free = free_bytes(path)
    need = f"needs {fmt_bytes(needed)}, " if needed is not None else ""
    return DiskFullError(f"{os.fspath(path)}: no space left on its file system ({need}{fmt_bytes(free)} free); "
                         "hint: free space there (or point --run/--out elsewhere), then rerun: the previous "
                         "files are whole")


def is_disk_full(e: BaseException) -> bool:
    """An OSError of a full file system or quota, including h5py's, which keeps the errno only in its text."""
    return isinstance(e, OSError) and (e.errno in _FULL or "No space left" in str(e) or "quota exceeded" in str(e))


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into `folder` (missing, not writable, a read-only or pseudo file system such
    as /proc, which stores no files and reports 0 bytes free), or None."""
    p = Path(folder)
    if not p.is_dir():
        return "does not exist" if not p.exists() else "is not a directory"
    st = os.statvfs(p)
    if st.f_blocks == 0:
        return "is on a pseudo file system that stores no files (such as /proc or /sys)"
    if st.f_flag & os.ST_RDONLY:
        return "is on a read-only file system"
    if not os.access(p, os.W_OK | os.X_OK):
        return "is not writable by you"
    return None


def check_space(path: str | os.PathLike, needed: int, margin: int = 64 << 10) -> None:
    """Refuse before writing `needed` bytes to `path` when they would not fit (a margin left for metadata);
    a folder that cannot hold files at all is bad input, not a full disk."""
    if needed + margin > free_bytes(path):
        folder = Path(path).absolute().parent
        problem = folder_problem(folder) if folder.is_dir() else None
        if problem:
            raise InputError(f"{os.fspath(path)}: cannot be written: {folder} {problem}; hint: write it elsewhere")
        raise disk_full(path, needed)


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some file systems cannot open directories; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def temp_name(path: str | os.PathLike) -> Path:
    """The temp file beside `path` that this process writes before renaming it onto `path`."""
    final = Path(path)
    return final.with_name(f"{final.name}.tmp-{os.getpid()}")


def leftovers(path: str | os.PathLike) -> list[Path]:
    """Temp files of writers of `path` (this process's or a killed one's: `<name>.tmp-<pid>`)."""
    return sorted(Path(p) for p in glob.glob(f"{glob.escape(os.fspath(path))}.tmp-*"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, needed: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it onto `path`.

    On any exception the temp file is removed and `path` is left exactly as it was; a full file
    system becomes a DiskFullError naming `path` and the `needed` bytes (checked first when given).
    The temp lives in the same directory so that os.replace is a same-file-system atomic rename.
    """
    final = Path(path)
    tmp = temp_name(final)
    if needed is not None:
        check_space(final, needed)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException as e:  # also KeyboardInterrupt / SLURM's SIGTERM turned into SystemExit
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if is_disk_full(e):
            raise disk_full(final, needed) from None
        raise
    fsync_path(final.parent, directory=True)  # make the rename itself durable


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically write `data` (temp file, fsync, rename): readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)
