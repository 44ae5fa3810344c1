"""`benchmark.py viz --command`: the whole local command a user types, timed in this checkout and at a baseline
revision in the same benchmark run, broken down.

Each side trains a run with its own code and one recipe (`launch_train.py --cluster debug --arch resnet20 --data
builtin --epochs E --batch-size 128 --lr 0.2`: a checkpoint of one release need not load in another), then
`launch_viz.py --cluster local --run R --images N --tasks 1` runs with the defaults, timed from the process's start
to its exit. The baseline runs from a `git worktree` of the revision, its tree first on PYTHONPATH, so the
launcher and its tasks import its own package. The parts come from
what the command prints and from submitit's own stamped lines (ms) in the run's logs:
- start-up: to the start of the shard's task process (the launcher's interpreter, imports, plan, submission);
  where the shard runs in the launcher (one local worker, today's way), what the other parts leave: the
  interpreter, imports, plan and exit;
- task: the task's process, start to end (its interpreter, imports, checkpoint and the shard), or in the
  launcher the shard's own clock; that clock ("shard work", where its log says it: an older release's task
  logs nothing) is reported too;
- projections and feature visualization: their parts' own clocks (in the launcher, after the task);
- collation: its own clock, where the launcher logs it; else "collation and figures", the rest (collation,
  figures drawn by the launcher, the waits between).
With the median inversion error per block of each side's shard (equal or lower is the condition of a speed-up).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .options import VizBench

__all__ = ["time_command", "parse_timeline", "task_span", "bench_command", "run_command"]

ROOT = Path(__file__).resolve().parents[2]
_SHARD = re.compile(r"shard 0(?: done)?: \d+ images in ([\d.]+) s")
_PARTS = {"projections": re.compile(r"projection part \d+: .* in ([\d.]+) s"),
          "feature visualization": re.compile(r"featviz part \d+: .* in ([\d.]+) s")}
_COLLATION = re.compile(r"collation: \d+ of \d+ shards in ([\d.]+) s")
_SUBMITIT = re.compile(r"submitit INFO \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\) - (Starting with|Job completed)")


def parse_timeline(lines: list[str], total: float, task: tuple[float, float] | None) -> dict[str, float]:
    """The parts (seconds, summing to `total`) of a command from its printed lines and its task's process (start,
    end, seconds since the command's start; None: the shard ran in the launcher's process, its own clock is the
    task, and start-up is the rest: interpreter, imports, plan and exit); "shard work" (not in the sum): the
    task's own clock, when it logs one (an older release's task logs nothing), else its whole process."""
    work = [float(m.group(1)) for line in lines if (m := _SHARD.search(line))]
    if task is None and not work:
        raise RuntimeError("no local task process and no shard's clock in the command's output: "
                           + " | ".join(lines[-5:]))
    start, end = task if task is not None else (0.0, work[-1])
    out = {"start-up": start, "task": end - start}
    for name, pattern in _PARTS.items():
        out[name] = sum(float(m.group(1)) for line in lines if (m := pattern.search(line)))
    collation = [float(m.group(1)) for line in lines if (m := _COLLATION.search(line))]
    if task is None:
        out["collation"] = sum(collation)
        out["start-up"] = max(0.0, total - sum(out.values()))
    else:
        out["collation and figures"] = max(0.0, total - sum(out.values()))
    return {**out, "shard work": work[-1] if work else end - start}


def task_span(logs: Path, wall0: float) -> tuple[float, float]:
    """(start, end) of the command's local task, seconds since `wall0`, from submitit's own stamped lines (ms) in
    logs/<job>_0_log.out (training's DEBUG_ logs are not a task)."""
    stamps: dict[str, list[float]] = {"Starting with": [], "Job completed": []}
    for path in sorted(logs.glob("*_0_log.out")):
        if path.name.startswith("DEBUG_"):
            continue
        for m in _SUBMITIT.finditer(path.read_text(errors="replace")):
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            stamps[m.group(3)].append(t - wall0)
    if not stamps["Starting with"] or not stamps["Job completed"]:
        raise RuntimeError(f"{logs}: no local task started and completed (submitit's lines in *_0_log.out)")
    return min(stamps["Starting with"]), max(stamps["Job completed"])


def time_command(argv: list[str], cwd: Path, env: dict[str, str], logs: Path) -> tuple[float, dict[str, float]]:
    """(wall seconds, parts) of one command: what it prints, and its local task's span from the run's `logs`."""
    wall0, t0 = time.time(), time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    total = time.perf_counter() - t0
    lines = r.stdout.splitlines()
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: " + " | ".join(lines[-5:]))
    try:
        task: tuple[float, float] | None = task_span(logs, wall0)
    except RuntimeError:  # no task process: the shard ran in the launcher (launch.array, one worker)
        task = None
    return total, parse_timeline(lines, total, task)


def _tree(rev: str, scratch: Path) -> Path:
    """This checkout (rev '') or a git worktree of `rev` under scratch (made once, reused)."""
    if not rev:
        return ROOT
    path = scratch / f"tree-{rev}"
    if not (path / "hpcviz").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--force", "--detach", str(path), rev],
                       check=True, capture_output=True, text=True)
    return path


def _errors(run: Path) -> dict[str, float]:
    """Median inversion error per block of the run's shard 0."""
    with h5py.File(next((run / "viz").rglob("shard-00000.h5")), "r") as f:
        group = f.get("invert_error")
        return {b: float(np.median(group[b][()])) for b in group} if group is not None else {}


def bench_command(scratch: Path, baseline: str = "3cb6f04", images: int = 8, epochs: int = 4, data: str = "builtin",
                  viz_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Both sides (this checkout, then the baseline), each trained and visualized in scratch; returns per side
    {"rev", "seconds", "parts", "median_error"} and the ratio of the baseline's seconds to ours. `data` and
    `viz_args` (options added to the command) make small versions for the tests."""
    scratch = scratch.resolve()  # each side runs in its own tree: a relative run path would land there
    out: dict[str, Any] = {"images": images, "epochs": epochs, "command": " ".join(
        ["launch_viz.py --cluster local", f"--images {images} --tasks 1", *viz_args])}
    for side, rev in (("ours", ""), ("baseline", baseline)):
        tree = _tree(rev, scratch)
        run = scratch / f"run-{side}"
        shutil.rmtree(run, ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
        train = [sys.executable, "jobs/launch_train.py", "--cluster", "debug", "--arch", "resnet20", "--data",
                 data, "--epochs", str(epochs), "--batch-size", "128", "--lr", "0.2", "--run", str(run)]
        r = subprocess.run(train, cwd=tree, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"training at {rev or 'this checkout'} failed: {r.stderr.strip()[-500:]}")
        seconds, parts = time_command([sys.executable, "jobs/launch_viz.py", "--cluster", "local", "--run", str(run),
                                       "--images", str(images), "--tasks", "1", *viz_args], tree, env,
                                      run / "logs")
        out[side] = {"rev": rev or "this checkout", "seconds": seconds, "parts": parts, "median_error": _errors(run)}
    out["ratio"] = out["baseline"]["seconds"] / out["ours"]["seconds"]
    return out


def run_command(opts: VizBench) -> dict:
    """`benchmark.py viz --command`: both sides printed, the ratio last."""
    r = bench_command(Path(opts.out) / "command-tmp", opts.baseline, opts.command_images, opts.command_epochs)
    print(f"viz command: {r['command']}, ResNet-20 trained {r['epochs']} epochs on the built-in data by each side")
    for side in ("baseline", "ours"):
        m = r[side]
        print(f"  {m['rev']}: {m['seconds']:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in m["parts"].items()
                                                               if k != "shard work")
              + f"; the shard's own clock {m['parts']['shard work']:.1f}); median inversion error "
              + ", ".join(f"{b} {e:.3f}" for b, e in m["median_error"].items()))
    print(f"viz command: {r['ratio']:.2f}x faster than {r['baseline']['rev']}")
    return {"command": r}
