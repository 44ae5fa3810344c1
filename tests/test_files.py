"""hpcviz.files: atomic writes, and a full file system as one line naming the path and the space, with the
previous files left whole: in the library and through every command that writes (on a small tmpfs)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from hpcviz.errors import DiskFullError
from hpcviz.files import atomic_path, check_space, fmt_bytes, free_bytes, write_bytes

from conftest import run_job


def test_atomic_write_keeps_the_old_file_until_the_new_one_is_whole(tmp_path):
    target = tmp_path / "f.bin"
    write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    assert fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(3 * 2 ** 20) == "3.0 MiB"
    with pytest.raises(DiskFullError, match=r"needs .* free.*hint"):
        check_space(tmp_path, free_bytes(tmp_path) * 2)


@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs of its own (root only: mount)."""
    if os.geteuid() != 0:
        pytest.skip("a full file system is made with a small tmpfs, which needs root (mount)")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path, leave: int) -> None:
    """Leave about `leave` bytes free on fs."""
    (fs / "filler").unlink(missing_ok=True)
    size = free_bytes(fs) - leave
    with open(fs / "filler", "wb") as f:
        f.truncate(0)
        chunk = b"\0" * (1 << 20)
        while size > 0:
            size -= f.write(chunk[:min(size, len(chunk))])


def test_a_full_disk_in_the_library(small_fs):
    target = small_fs / "out.bin"
    write_bytes(target, b"previous")
    fill(small_fs, 200_000)
    with pytest.raises(DiskFullError) as e:
        write_bytes(target, b"x" * 1_000_000)  # refused before writing: the size is known
    assert str(target) in str(e.value) and "needs 976.6 KiB" in str(e.value)
    with pytest.raises(DiskFullError) as e:
        with atomic_path(target) as tmp, open(tmp, "wb") as f:  # no size given: the write itself fails
            for _ in range(10):
                f.write(b"y" * 100_000)
                f.flush()
                os.fsync(f.fileno())
    assert str(target) in str(e.value) and "no space left" in str(e.value)
    assert target.read_bytes() == b"previous" and sorted(os.listdir(small_fs)) == ["filler", "out.bin"]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_job(script, *args)


def one_line(r: subprocess.CompletedProcess, *parts: str) -> None:
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "no space left" in errors[0] and all(p in errors[0] for p in parts), errors[0]


@pytest.mark.slow
def test_every_command_on_a_full_disk_says_so_in_one_line_and_keeps_the_files(small_fs):
    run = small_fs / "run"
    tiny = ["--run", str(run), "--cluster", "local", "--device", "cpu", "--data", "builtin:20", "--image-size", "16",
            "--arch", "resnet20", "--epochs", "1", "--batch-size", "32", "--lr", "0.05"]
    viz = ["--images", "4", "--tasks", "2", "--invert-steps", "5", "--blocks", "conv1,layer3.2",
           "--invert-blocks", "conv1", "--deconv-blocks", "layer3.2", "--paths", "both", "--featviz-blocks",
           "conv1,layer3.2", "--featviz-steps", "2"]
    r = cli("launch_pipeline.py", *tiny, *viz, "--report-images", "1", "--invert-images", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    fill(small_fs, 300_000)
    before = snapshot(run)
    ckpt = snapshot(run / "checkpoints")
    # training: the checkpoint at the end of the new epoch does not fit; the previous ones stay as they were
    r = cli("launch_train.py", *tiny, "--resume", "--epochs", "2")
    one_line(r, str(run / "checkpoints" / "last.pt"), "needs")
    assert snapshot(run / "checkpoints") == ckpt
    # the report: refused before a single file of report/ is replaced
    report = snapshot(run / "report")
    r = cli("aggregate.py", "--run", str(run))
    one_line(r, "needs")
    assert snapshot(run / "report") == report and not list(run.glob("report.*-*"))
    record = json.loads((run / "manifest.json").read_text())["aggregate"]  # never left 'done' by a failed one
    assert record["status"] == "failed" and "no space left" in record["error"], record
    # a packed data set, an evaluation: nothing half-written left behind
    r = cli("pack_data.py", "--data", "builtin:100", "--out", str(small_fs / "packed.h5"))
    one_line(r, str(small_fs / "packed.h5"), "needs 2.9 MiB")
    assert not list(small_fs.glob("packed.h5*"))
    (small_fs / "filler").unlink()
    fill(small_fs, 20_000)
    r = cli("evaluate.py", "--run", str(run), "--data", "builtin:20", "--name", "again")
    one_line(r, "eval-again.json")
    assert not list(run.glob("eval-again*"))
    # a shard: its task fails with the reason, the other shard and viz.h5 stay
    (small_fs / "filler").unlink()
    (run / "viz" / "shards" / "shard-00001.h5").unlink()
    fill(small_fs, 70_000)  # the small files fit (with their 64 KiB margin), the shard does not
    r = cli("launch_viz.py", "--run", str(run), "--cluster", "local", "--device", "cpu", *viz)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "no space left" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert not list((run / "viz" / "shards").glob("*.tmp-*"))
    kept = {k: v for k, v in before.items() if k.startswith("viz/shards/shard-00000") or k.startswith("checkpoints")}
    assert {k: v for k, v in snapshot(run).items() if k in kept} == kept
