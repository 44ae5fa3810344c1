"""Every bad input through the real command line (jobs/*.py), against a finished run: exit code 2 (or the
documented one), exactly one `error:` line naming the input, no traceback, and not one byte of the run
changed, added or removed. Plus the parsers derived from the configs (hpcviz.cli)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcviz import store

from conftest import ROOT, run_job

pytestmark = pytest.mark.slow  # whole commands on finished runs: make test runs them, make check does not

TRAIN = ["--cluster", "local", "--device", "cpu", "--data", "builtin:20", "--image-size", "16", "--arch", "resnet20",
         "--epochs", "1", "--batch-size", "32", "--lr", "0.05"]
VIZ = ["--cluster", "local", "--device", "cpu", "--images", "4", "--tasks", "2", "--featviz-blocks", "all",
       "--featviz-steps", "2", "--invert-steps", "5"]
PIPE = [*TRAIN, *VIZ[4:], "--report-images", "1", "--invert-images", "1"]
T, V, P = "launch_train.py", "launch_viz.py", "launch_pipeline.py"

# ---- issue 20 (helper i20b): every bad value refused before work, nothing foreign read or run; the inputs are
# made by issue20_inputs (called by the fixture `finished`), the special setups are the test_issue20_* below
IMPORT = ["--weights", "{tmp}/r20.pt", "--arch", "resnet20", "--data", "builtin:20", "--image-size", "16", "--run",
          "{tmp}/t", "--device", "cpu"]
NEEDS = "needs about"  # the memory estimate's line: hpcviz.memory
ISSUE20_CASES = [
    # seeds: 0..2**32-1, named by their own option, before anything starts (was: a traceback, a job's failure,
    # or a whole epoch trained first)
    (T, ["--run", "{tmp}/t", *TRAIN, "--split-seed", "-1"], 2, "--split-seed -1: a seed is a whole number in [0, "),
    (T, ["--run", "{tmp}/t", *TRAIN, "--seed", "4294967296"], 2, "--seed 4294967296: a seed is a whole number"),
    (V, ["--run", "{run}", *VIZ, "--fresh", "--seed", "-1"], 2, "--seed -1: a seed is a whole number"),
    (P, ["--run", "{tmp}/t", *PIPE, "--viz-seed", "-1"], 2, "--viz-seed -1: a seed is a whole number"),
    ("pack_data.py", ["--data", "builtin:2", "--out", "{tmp}/s.h5", "--seed", "-1"], 2, "--seed -1: a seed"),
    ("import_model.py", [*IMPORT, "--split-seed", "-1"], 2, "--split-seed -1: a seed is a whole number"),
    # what the data's size allows, checked with the other options (was: refused inside the training job)
    (P, ["--run", "{tmp}/t", *PIPE, "--batch-size", "256"], 2,
     "--batch-size 256: larger than the 180 training images of --data builtin:20"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--batch-size", "33", "--nproc", "2"], 2,
     "--batch-size 33: must be divisible by the 2 processes (the global batch"),
    # memory: the estimate against what there is, before allocating (was: ArrayMemoryError, or GBs allocated)
    (T, ["--run", "{tmp}/t", *TRAIN, "--image-size", "100000"], 2, f"--image-size 100000 with --data builtin:20: {NEEDS}"),
    (P, ["--run", "{tmp}/t", *PIPE, "--image-size", "4096"], 2, f"--image-size 4096 with --data builtin:20: {NEEDS}"),
    ("import_model.py", [*IMPORT, "--image-size", "100000"], 2, f"--image-size 100000 with --data builtin:20: {NEEDS}"),
    ("import_model.py", [*IMPORT, "--image-size", "4096"], 2, f"--image-size 4096 with --data builtin:20: {NEEDS}"),
    ("pack_data.py", ["--data", "builtin:2", "--out", "{tmp}/s.h5", "--image-size", "100000"], 2, NEEDS),
    ("evaluate.py", ["--run", "{run}", "--data", "builtin:1000000000"], 2,
     f"--data builtin:1000000000 at the run's image size 16: {NEEDS}"),
    # a CIFAR-10 batch whose pickle would run a shell command: refused unread (test_issue20_cifar: it never ran)
    ("pack_data.py", ["--data", "cifar10:{tmp}/cifar_evil", "--out", "{tmp}/c.h5"], 2,
     "data_batch_1 is not a CIFAR-10 batch: its pickle calls posix.system"),
    ("import_model.py", [*IMPORT, "--data", "cifar10:{tmp}/cifar_evil"], 2,
     "data_batch_1 is not a CIFAR-10 batch: its pickle calls posix.system"),
    # inspection
    ("inspect_results.py", ["{run}", "--block", "layer3.2", "--channel", "5", "--max-items", "-3"], 2,
     "--max-items -3: must be at least 1"),
    ("inspect_results.py", ["{run}/viz/viz.h5", "images", "--index", "0", "--png", "/proc/x.png"], 2,
     "the folder /proc is on a pseudo file system that stores no files"),
    # weights that torch refuses: one line (test_issue20_weights: and nothing else on stderr)
    ("import_model.py", [*IMPORT, "--weights", "{tmp}/plain.pkl"], 2, "plain.pkl: not a readable state dict"),
    ("import_model.py", [*IMPORT, "--weights", "{tmp}/object.pt"], 2, "object.pt: not a readable state dict"),
]

# (command, arguments, exit code, what the error line must say); {run}: a finished run, {tmp}: a scratch folder
CASES = [
    # training options that are out of range or not one of the choices
    (T, ["--run", "{tmp}/t", *TRAIN, "--log-every", "0"], 2, "--log-every 0: must be at least 1"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--momentum", "-1"], 2, "--momentum -1.0: must be in [0, 1]"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--label-smoothing", "2"], 2, "--label-smoothing 2.0: must be in [0, 1)"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--checkpoint-every", "-5"], 2, "--checkpoint-every -5: must be at least 0"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--epochs", "0"], 2, "--epochs 0: must be at least 1"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--epochs", "abc"], 2, "--epochs invalid int value: 'abc'"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--batch-size", "0"], 2, "--batch-size 0: must be at least 1"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--lr", "0"], 2, "--lr 0.0: must be positive"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--val-fraction", "0"], 2, "--val-fraction 0.0: must be above 0"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--weight-decay", "-1"], 2, "--weight-decay -1.0: must be at least 0"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--warmup-epochs", "-1"], 2, "--warmup-epochs -1.0: must be at least 0"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--data-workers", "0"], 2, "--data-workers 0: must be at least 1"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--dist-timeout", "0"], 2, "--dist-timeout 0.0: must be positive"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--arch", "resnet19"], 2, "--arch 'resnet19': not one of resnet18"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--stem", "tiny"], 2, "--stem 'tiny': not one of"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--schedule", "step"], 2, "--schedule 'step': not one of onecycle"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--amp", "fp8"], 2, "--amp 'fp8': not one of auto, bf16, off"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--data-placement", "disk"], 2, "--data-placement 'disk': not one of"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--recipe", "fast"], 2, "--recipe 'fast': not one of default, seed"),
    # data and files
    (T, ["--run", "{tmp}/t", *TRAIN, "--data", "/no/such/dir"], 2, "--data /no/such/dir: no such directory"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--data", "{tmp}/badlabels.h5"], 2,
     "badlabels.h5: labels 0..12 are outside 0..9"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--data", "builtin:1"], 2, "validation split would be empty"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--init", "{tmp}/missing.pt"], 2, "missing.pt: no such file"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--init", "{tmp}/garbage.pt"], 2, "garbage.pt: not a readable state dict"),
    # where to run
    (T, ["--run", "{tmp}/t", *TRAIN, "--time", "-1"], 2, "--time -1: must be at least 0"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--nproc", "0"], 2, "--nproc 0: must be at least 1"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--nodes", "0"], 2, "--nodes 0: must be at least 1"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--nodes", "2"], 2, "--nodes 2: --cluster local runs on this one machine"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--gpus", "-1"], 2, "--gpus -1: must be at least 0"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--cluster", "foo"], 2, "--cluster 'foo': not one of auto, slurm, local"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--profile", "nosuch"], 2, "--profile nosuch: no file"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--gpus", "4", "--device", "auto"], 2, "--gpus 4: this machine has 0 GPU(s)"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--gpus", "1", "--device", "cpu"], 2, "--gpus 1 with --device cpu"),
    (T, ["--run", "{tmp}/t", *TRAIN, "--cluster", "debug", "--nproc", "2"], 2, "--cluster debug runs one process"),
    # a finished run: refused requests leave it exactly as it was (the manifest included)
    (T, ["--run", "{run}", *TRAIN], 2, "already holds a checkpoint"),
    (T, ["--run", "{run}", *TRAIN, "--resume", "--gpus", "4", "--device", "auto"], 2, "--gpus 4: this machine has 0"),
    (T, ["--run", "{run}", *TRAIN, "--resume", "--arch", "resnet32"], 2, "the checkpoint is arch resnet20"),
    (T, ["--run", "{run}", *TRAIN, "--resume", "--data", "{tmp}/three"], 2, "with 10 classes, this run is"),
    (T, ["--run", "{run}", *TRAIN, "--resume", "--data", "builtin:30"], 2, "was trained on other data"),
    (T, ["--run", "{run}", *TRAIN, "--resume", "{tmp}/garbage.pt"], 2, "garbage.pt: not a readable checkpoint"),
    (T, ["--run", "{run}", *TRAIN, "--resume", "{tmp}/missing.pt"], 2, "missing.pt: no such checkpoint file"),
    # the visualization array
    (V, ["--run", "{run}", *VIZ, "--fresh", "--gpus", "4", "--device", "auto"], 2, "--gpus 4: this machine has 0"),
    (V, ["--run", "{run}", *VIZ, "--fresh", "--profile", "nosuch"], 2, "--profile nosuch: no file"),
    (V, ["--run", "{run}", *VIZ, "--fresh", "--images", "0"], 2, "--images 0: must be at least 1"),
    (V, ["--run", "{run}", *VIZ, "--fresh", "--batch-size", "0"], 2, "--batch-size 0: must be at least 1"),
    (V, ["--run", "{run}", *VIZ, "--fresh", "--indices", "99999"], 2, "--indices [99999]: outside the val split"),
    (V, ["--run", "{run}", *VIZ, "--tasks", "0"], 2, "--tasks 0: must be at least 1"),
    (V, ["--run", "{run}", *VIZ, "--per-task", "0"], 2, "--per-task 0: must be at least 1"),
    (V, ["--run", "{run}", *VIZ, "--invert-steps", "-1"], 2, "--invert-steps -1: must be at least 0"),
    (V, ["--run", "{run}", *VIZ, "--invert-blocks", "layr3.2"], 2, "--invert-blocks layr3.2: not blocks"),
    (V, ["--run", "{run}", *VIZ, "--blocks", "layer9.9"], 2, "--blocks layer9.9: not blocks of this model"),
    (V, ["--run", "{run}", *VIZ, "--deconv-blocks", "layer0.0"], 2, "--deconv-blocks layer0.0: not blocks"),
    (V, ["--run", "{run}", *VIZ, "--featviz-blocks", "layer0.0"], 2, "--featviz-blocks layer0.0: not blocks"),
    (V, ["--run", "{run}", *VIZ, "--featviz-steps", "-1"], 2, "--featviz-steps -1: must be at least 0"),
    (P, ["--run", "{run}", *PIPE, "--featviz-batch-size", "-2"], 2, "--featviz-batch-size -2: must be at least 0"),
    (V, ["--run", "{run}", *VIZ, "--paths", "sideways"], 2, "--paths sideways: valid paths are both"),
    (V, ["--run", "{run}", *VIZ, "--prior", "l2"], 2, "--prior 'l2': not one of tv, none"),
    (V, ["--run", "{run}", *VIZ, "--split", "test"], 2, "--split 'test': not one of val, train"),
    (V, ["--run", "{run}", *VIZ, "--indices", "3,x"], 2, "--indices '3,x': not comma-separated integers"),
    (V, ["--run", "{run}", *VIZ, "--compression", "zip"], 2, "--compression 'zip': not one of"),
    (V, ["--run", "{run}", *VIZ[:-2], "--invert-steps", "6"], 2, "holds shards of another request"),
    (V, ["--run", "{tmp}/nope", *VIZ], 2, "nope: no checkpoints/ in it"),
    (V, [*VIZ], 2, "the following arguments are required: --run"),
    # the pipeline
    (P, ["--run", "{run}", "--status", "--retry-failed"], 2, "--status and --retry-failed together"),
    (P, ["--status"], 2, "--status/--retry-failed need --run"),
    (P, ["--run", "{tmp}/nope", "--retry-failed"], 2, "nope: no manifest.json"),
    (P, ["--run", "{run}", *PIPE], 2, "already holds a checkpoint"),
    (P, ["--run", "{run}", *PIPE, "--viz-batch-size", "0"], 2, "--viz-batch-size 0: must be at least 1"),
    (P, ["--run", "{run}", *PIPE, "--viz-split", "test"], 2, "--viz-split 'test': not one of val, train"),
    (P, ["--run", "{run}", *PIPE, "--report-images", "0"], 2, "--report-images 0: must be at least 1"),
    (P, ["--run", "{run}", *PIPE, "--resume", "--cluster", "inline"], 2, "the pipeline submits jobs"),
    (P, ["--run", "{run}", *PIPE, "--resume", "--tasks", "0"], 2, "--tasks 0: must be at least 1"),
    # the report, evaluation, inspection, packing
    ("aggregate.py", ["--run", "{tmp}/nope"], 2, "nope: not a run directory"),
    ("aggregate.py", ["--run", "{run}", "--channels", "0"], 2, "--channels 0: must be at least 1"),
    ("evaluate.py", ["--run", "{run}", "--data", "builtin:20", "--name", "../../eval"], 2, "--name '../../eval'"),
    ("evaluate.py", ["--run", "{run}", "--data", "builtin:20", "--batch-size", "-1"], 2, "--batch-size -1"),
    ("evaluate.py", ["--run", "{tmp}/nope", "--data", "builtin:20"], 2, "nope: no checkpoints/ in it"),
    ("evaluate.py", ["--run", "{run}", "--data", "/no/such"], 2, "--data /no/such: no such directory"),
    ("evaluate.py", ["--run", "{run}", "--data", "{tmp}/three"], 2, "classes the model does not know"),
    ("inspect_results.py", ["{run}/viz/viz.h5", "images", "--png", "{tmp}/nodir/x.png"], 2, "does not exist"),
    ("inspect_results.py", ["{run}/viz/viz.h5", "act/layer9"], 2, "no dataset 'act/layer9'"),
    ("inspect_results.py", ["{run}", "act/layer1.0"], 2, "is a run directory"),
    ("inspect_results.py", ["{run}/eval.json"], 2, "not an HDF5 file"),
    ("inspect_results.py", ["{run}/viz/viz.h5", "images", "--index", "99"], 2, "index 99 out of range"),
    ("inspect_results.py", ["{run}", "--max-items", "0"], 2, "--max-items 0: must be at least 1"),
    ("pack_data.py", ["--data", "builtin:2", "--out", "{tmp}/x.txt"], 2, "--out {tmp}/x.txt: must end in .h5"),
    ("pack_data.py", ["--data", "/no/such", "--out", "{tmp}/y.h5"], 2, "--data /no/such: no such directory"),
    ("pack_data.py", ["--data", "builtin:2", "--out", "{run}/viz/viz.h5"], 2, "already exists; hint: pass --force"),
    ("pack_data.py", ["--data", "builtin:2", "--out", "{tmp}/z.h5", "--image-size", "0"], 2, "--image-size 0"),
    *ISSUE20_CASES,
]


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (hidden ones and logs included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A whole pipeline run through the command line, plus the odd inputs the cases need."""
    base = tmp_path_factory.mktemp("cmds")
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / P), "--run", str(base / "run"), *PIPE], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with h5py.File(base / "badlabels.h5", "w") as f:  # a packed file whose labels exceed its classes
        f.attrs["format"], f.attrs["classes"] = "hpcviz-packed-v1", '["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]'
        f.create_dataset("images", data=np.zeros((40, 3, 16, 16), np.uint8))
        f.create_dataset("labels", data=np.arange(40) % 13)
    (base / "garbage.pt").write_bytes(b"not a checkpoint at all")
    from PIL import Image
    for name in ("ant", "bee", "cow"):  # another data set: 3 classes
        (base / "three" / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), (i * 20, 40, 80)).save(base / "three" / name / f"{i}.png")
    issue20_inputs(base)
    return base


def run_case(command: str, args: list[str], tmp: Path, run: Path) -> subprocess.CompletedProcess:
    args = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp)) for a in args]
    return run_job(command, *args, timeout=300, cpu=True)


def test_every_bad_input_is_one_line_and_changes_nothing(finished, tmp_path):
    """All cases, three at a time, each worker on its own copy of the finished run (a case that takes the
    run's lock must not meet another case holding it)."""
    assert len(CASES) >= 60
    workers = 3
    runs = []
    for w in range(workers):
        shutil.copytree(finished / "run", tmp_path / f"run{w}", symlinks=True)
        runs.append(tmp_path / f"run{w}")

    def check(k: int) -> str:
        command, args, code, message = CASES[k]
        run = runs[k % workers]
        before = snapshot(run)
        r = run_case(command, args, finished, run)
        message = message.replace("{tmp}", str(finished))
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        problems = []
        if r.returncode != code:
            problems.append(f"exit {r.returncode}, expected {code}")
        if len(errors) != 1 or message not in errors[0]:
            problems.append(f"error lines {errors}, expected one with {message!r}")
        if "Traceback" in r.stderr:
            problems.append("a traceback")
        after = snapshot(run)
        if after != before:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            problems.append(f"the run changed: {changed}")
        return f"{command} {' '.join(args)}: " + "; ".join(problems) + f"\n{r.stderr[-800:]}" if problems else ""

    def worker(w: int) -> list[str]:  # a worker's cases one after the other, on its own copy
        return [check(k) for k in range(w, len(CASES), workers)]

    with ThreadPoolExecutor(workers) as pool:
        failures = [f for found in pool.map(worker, range(workers)) for f in found if f]
    assert not failures, "\n\n".join(failures)
    assert not (finished / "t").exists()  # nothing was created for the refused new runs either


# ------------------------------------------------------------------------------------------ derived parsers

def test_options_come_from_the_config_fields():
    import dataclasses

    from hpcviz.commands import pipeline, train, viz
    from hpcviz.config import AggregateConfig, LaunchConfig, TrainConfig, VizConfig
    help_text = train.get_args_parser(add_help=True).format_help()
    for f in dataclasses.fields(TrainConfig):  # every field is an option, with its help, default and unit
        if f.metadata.get("cli", True):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            assert flag in help_text, flag
    assert "(default 10.0 minutes)" in help_text and "(default 256 images)" in help_text
    p = pipeline.get_args_parser()
    args = p.parse_args(["--run", "r", "--batch-size", "64", "--viz-batch-size", "8", "--report-images", "5",
                         "--images", "7", "--no-augment"])
    from hpcviz.cli import given
    assert given(args, TrainConfig)["batch_size"] == 64 and given(args, TrainConfig)["augment"] is False
    assert given(args, VizConfig, prefix="viz-", skip=("run_dir",)) == {"batch_size": 8, "images": 7}
    assert given(args, AggregateConfig, skip=("run_dir",)) == {"images": 5}  # --report-images, not --images
    assert "gpus" not in given(args, LaunchConfig)  # not given: None, so that the launcher resolves it
    v = viz.get_args_parser().parse_args(["--run", "r", "--deconv-blocks", "none", "--indices", "1,2"])
    assert given(v, VizConfig)["deconv_blocks"] == [] and given(v, VizConfig)["indices"] == [1, 2]


# ------------------------------------------------------------------------------------------ the run's state
# What a run holds is verified from its files (hpcviz.runstate), never read from the manifest alone: a broken
# run makes `--status --wait`, the report and every launcher exit non-zero, naming what is not done.

def _drop_shard(run: Path) -> None:
    (run / "viz" / "shards" / "shard-00001.h5").unlink()


def _truncate_shard(run: Path) -> None:
    path = run / "viz" / "shards" / "shard-00001.h5"
    path.write_bytes(path.read_bytes()[:4096])


def _drop_part(run: Path) -> None:
    (run / "viz" / "examples" / "part-00003.h5").unlink()


def _drop_featviz_part(run: Path) -> None:
    (run / "viz" / "featviz" / "part-00000.h5").unlink()


def _swap_checkpoint(run: Path) -> None:
    """Another run's last.pt and its sha256 sidecar copied in (a checkpoint that verifies, of other weights)."""
    other = run.parent / "other-ckpt"
    for name in ("last.pt", "last.pt.sha256"):
        shutil.copy(other / "checkpoints" / name, run / "checkpoints" / name)


# (what breaks the run, command, arguments, exit code, what the error line must say); the run is not changed
STATE_CASES = [
    (_drop_shard, P, ["--run", "{run}", "--status", "--wait"], 1, "viz[1] missing"),
    (_truncate_shard, P, ["--run", "{run}", "--status", "--wait"], 1, "viz[1] "),
    (_drop_part, P, ["--run", "{run}", "--status", "--wait"], 1, "project[3] missing"),
    (_drop_featviz_part, P, ["--run", "{run}", "--status", "--wait"], 1, "featviz[0] missing"),
    (_swap_checkpoint, P, ["--run", "{run}", "--status", "--wait"], 1, "eval stale"),
    (None, "aggregate.py", ["--run", "{run}", "--projection-device", "cuda"], 2,
     "--projection-device cuda: no CUDA device is visible here"),
    (None, P, ["--run", "{run}", "--retry-failed", "--cluster", "local", "--projection-device", "cuda"], 2,
     "--projection-device cuda: no CUDA device is visible here"),
]


@pytest.fixture(scope="module")
def other_checkpoint(finished) -> Path:
    """A checkpoint of other weights (another seed) on the same data, beside the finished run."""
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / T), "--run", str(finished / "other-ckpt"), *TRAIN,
                        "--seed", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    return finished / "other-ckpt"


def test_a_broken_run_is_never_called_done(finished, other_checkpoint, tmp_path):
    """Each case on its own copy of the finished run, broken as the case says: the command exits with the
    code, one error line naming what is not done, and changes nothing. A sound run's wait exits 0."""
    r = run_case(P, ["--run", "{run}", "--status", "--wait"], finished, finished / "run")
    assert r.returncode == 0 and not r.stderr.count("error:"), r.stderr[-2000:]
    failures = []
    for k, (breaks, command, args, code, message) in enumerate(STATE_CASES):
        run = tmp_path / f"case{k}" / "run"
        shutil.copytree(finished / "run", run, symlinks=True)
        shutil.copytree(other_checkpoint, run.parent / "other-ckpt")
        if breaks:
            breaks(run)
        before = snapshot(run)
        r = run_case(command, args, finished, run)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        problems = [f"exit {r.returncode}, expected {code}"] if r.returncode != code else []
        if len(errors) != 1 or message not in errors[0]:
            problems.append(f"error lines {errors}, expected one with {message!r}")
        if "Traceback" in r.stderr:
            problems.append("a traceback")
        if snapshot(run) != before:
            problems.append("the run changed")
        if problems:
            failures.append(f"{getattr(breaks, '__name__', '-')} {command} {' '.join(args)}: {'; '.join(problems)}"
                            f"\n{r.stderr[-800:]}")
    assert not failures, "\n\n".join(failures)


def test_a_changed_checkpoint_makes_everything_stale_and_retry_redoes_it(finished, other_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run, symlinks=True)
    shutil.copytree(other_checkpoint, tmp_path / "other-ckpt")
    _swap_checkpoint(run)
    new_sha = (run / "checkpoints" / "last.pt.sha256").read_text().strip()
    r = run_case("aggregate.py", ["--run", "{run}"], finished, run)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "eval stale" in errors[0], r.stderr[-2000:]
    md = (run / "report" / "report.md").read_text()
    head = md[:md.index("## 1. Training")]
    assert "STALE: the run's checkpoint changed" in head and new_sha[:12] in head and "--retry-failed" in head
    from PIL import Image
    meta = json.loads(Image.open(run / "report" / "figures" / "conv1_filters.png").info["Description"])
    assert meta["checkpoint_sha256"] == new_sha  # the filters are drawn from the new weights, and say so
    r = run_case(P, ["--run", "{run}", "--retry-failed", "--cluster", "local"], finished, run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "viz" / "plan.json").read_text())["checkpoint_sha256"] == new_sha
    assert json.loads((run / "eval.json").read_text())["checkpoint_sha256"] == new_sha
    assert "STALE" not in (run / "report" / "report.md").read_text()
    r = run_case(P, ["--run", "{run}", "--status", "--wait"], finished, run)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_a_failed_projection_is_an_error_and_keeps_what_was_valid(finished, tmp_path):
    """launch_viz whose projection parts cannot be written: exit 1 naming them; the shards, viz.h5 and the parts
    of other blocks stay presented; the aggregation then shows every block whose parts are current."""
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run, symlinks=True)
    shutil.rmtree(run / "viz" / "examples")
    (run / "viz" / "examples").write_text("not a folder")  # every part write fails
    r = run_case(V, ["--run", "{run}", *VIZ, "--seed", "1", "--fresh"], finished, run)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "projection part(s) failed" in errors[0], r.stderr[-2000:]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["viz"]["status"] != "done" and manifest["viz"]["error"]
    assert store.read_attrs(run / "viz" / "viz.h5")["complete"] is True  # the shards' collation is kept
    r = run_case(P, ["--run", "{run}", "--status", "--wait"], finished, run)
    assert r.returncode == 1 and "project[" in r.stderr, r.stderr[-2000:]
    status = run_case(P, ["--run", "{run}", "--status"], finished, run).stdout
    assert re.search(r"aggregate .*stale.*made before .*the shards", status), status  # the seed-0 report
    (run / "viz" / "examples").unlink()  # the cause fixed: the aggregation computes the parts
    r = run_case("aggregate.py", ["--run", "{run}"], finished, run)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_case(P, ["--run", "{run}", "--status", "--wait"], finished, run)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------------------ issue 20 (i20b)
# Inputs of ISSUE20_CASES and the special setups below: what a run must refuse, or show as written.
HOSTILE_CLASSES = ["[/]", "[red]a", "$x$", "$", "*b*_c_", "<b>&amp;</b>", "a|b [l](http://e)", "$\\undefined$",
                   "esc\x1b[31mred"]


class _Touch:
    """A pickle whose loading runs `touch PATH` (what a hostile CIFAR-10 batch could do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def write_cifar(root: Path, marker: Path | None = None) -> None:
    """torchvision's CIFAR-10 layout, tiny: 5 training batches and a test batch of 2 images each, dicts pickled with
    protocol 2 as the real ones are (numpy arrays, lists, str, bytes); with `marker`, data_batch_1 is _Touch(marker)."""
    import pickle
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {"batch_label": name, "labels": [k % 10, (k + 1) % 10], "filenames": [b"a.png", b"b.png"],
                 "data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 2, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    if marker is not None:
        (folder / "data_batch_1").write_bytes(pickle.dumps(_Touch(marker), protocol=2))


def issue20_inputs(base: Path) -> None:
    import pickle

    import torch

    from hpcviz.models import build_model
    torch.save(build_model("resnet20", 10, "cifar").state_dict(), base / "r20.pt")
    (base / "plain.pkl").write_bytes(pickle.dumps({"conv1.weight": np.zeros(3)}, protocol=4))  # not torch.save
    torch.save({"fc.weight": object()}, base / "object.pt")  # torch.save of what is not a tensor
    write_cifar(base / "cifar_evil", marker=base / "pwned")
    write_cifar(base / "cifar_good")


def _one_error(r: subprocess.CompletedProcess, code: int, message: str) -> None:
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == code and len(errors) == 1 and message in errors[0], (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr


def test_issue20_cifar(finished, tmp_path):
    """A CIFAR-10 batch whose pickle runs a shell command is refused before it runs (through both commands that
    read CIFAR-10 from disk), and a genuine batch, pickled as the real ones, still loads."""
    marker = finished / "pwned"
    for command, args in (("pack_data.py", ["--data", "cifar10:{tmp}/cifar_evil", "--out", "{tmp}/c.h5"]),
                          ("import_model.py", [*IMPORT, "--run", str(tmp_path / "imp"), "--data",
                                               "cifar10:{tmp}/cifar_evil"])):
        _one_error(run_case(command, args, finished, finished), 2, "is not a CIFAR-10 batch")
        assert not marker.exists(), f"{command} ran the pickle's command"
    r = run_case("pack_data.py", ["--data", "cifar10:{tmp}/cifar_good", "--out", str(tmp_path / "good.h5")],
                 finished, finished)
    assert r.returncode == 0, r.stderr[-2000:]
    with h5py.File(tmp_path / "good.h5") as f:
        assert f["images"].shape == (10, 3, 32, 32) and list(f["labels"][:4]) == [0, 1, 1, 2]


def test_issue20_weights(finished, tmp_path):
    """Weights torch refuses: the error line and nothing else (no torch UserWarning lines before it)."""
    for weights in ("plain.pkl", "object.pt"):
        r = run_case("import_model.py", [*IMPORT, "--weights", f"{{tmp}}/{weights}"], finished, finished)
        _one_error(r, 2, f"{weights}: not a readable state dict")
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_issue20_no_flags_say_what_they_do():
    """Every --no-X option of every command: its help says what giving it does (turn off ...), not what X does."""
    seen = set()
    for job in sorted((ROOT / "jobs").glob("*.py")):
        if job.name == "benchmark.py":  # subcommands, no --no-X option
            continue
        r = subprocess.run([sys.executable, str(job), "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "COLUMNS": "1000"})
        assert r.returncode == 0, r.stderr
        for line in r.stdout.splitlines():
            words = line.split()
            if words and words[0].startswith("--no-"):
                assert " ".join(words[1:]).startswith("turn off:"), f"{job.name}: {line.strip()}"
                seen.add(words[0])
    assert {"--no-augment", "--no-nesterov", "--no-channels-last", "--no-projections", "--no-embed",
            "--no-eval"} <= seen


def test_issue20_foreign_projection_part(finished, tmp_path):
    """A projection part that is not this run's (another run's, copied in: its digest differs) is never read
    as this run's: --block/--channel shows the lists without it, --png and a read of examples/* are refused,
    as the aggregation would recompute it (collation.stale_parts)."""
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run, symlinks=True)
    part = run / "viz" / "examples" / "part-00009.h5"
    with h5py.File(part, "r+") as f:  # what a part of another run (other images, lists or weights) differs in
        assert f.attrs["block"] == "layer3.2"
        f.attrs["digest"] = "0" * 64
        f["examples/layer3.2/box"][...] = 7
    png = tmp_path / "x.png"
    r = run_case("inspect_results.py", [str(run), "--block", "layer3.2", "--channel", "5", "--png", str(png)],
                 finished, run)
    _one_error(r, 2, "viz/examples/part-00009.h5 is not this run's projection part")
    assert not png.exists() and not r.stdout.strip()  # refused before anything is printed
    r = run_case("inspect_results.py", [str(run), "--block", "layer3.2", "--channel", "5"], finished, run)
    assert r.returncode == 0 and "projections not shown" in r.stdout and "7:7" not in r.stdout, r.stdout
    r = run_case("inspect_results.py", [str(run / "viz" / "viz.h5"), "examples/layer3.2/box", "--index", "5"],
                 finished, run)
    _one_error(r, 2, "is not this run's projection part")
    r = run_case("inspect_results.py", [str(run), "--block", "layer3.1", "--channel", "5", "--png", str(png)],
                 finished, run)
    assert r.returncode == 0 and png.is_file(), r.stderr[-2000:]  # the other parts are this run's
    r = run_case("inspect_results.py", [str(run)], finished, run)  # the run's summary lists the parts
    assert r.returncode == 0 and "projection parts: 9 done of 10" in r.stdout, r.stdout
    assert re.search(r"part-00009\.h5\s.*stale", r.stdout), r.stdout


@pytest.mark.slow
def test_issue20_changed_checkpoint_says_why(finished, tmp_path):
    """After the checkpoint changed, the projections cannot be made: --png says that, not --no-projections."""
    from hpcviz.train import checkpoint
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run, symlinks=True)
    state = checkpoint.load_checkpoint(run / "checkpoints")
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    checkpoint.save_checkpoint({k: v for k, v in state.items() if k not in ("path", "sha256")}, run / "checkpoints")
    part = run / "viz" / "examples" / "part-00003.h5"
    block = store.read_attrs(part)["block"]
    part.unlink()  # so that the aggregation must project this block again
    subprocess.run([sys.executable, str(ROOT / "jobs" / "aggregate.py"), "--run", str(run)], cwd=ROOT,
                   capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    r = run_case("inspect_results.py", [str(run), "--block", block, "--channel", "5", "--png",
                                        str(tmp_path / "x.png")], finished, run)
    _one_error(r, 2, "checkpoints/last.pt changed since the visualization was planned")


def test_issue20_virtual_sources(finished, tmp_path):
    """HDF5 looks for a virtual dataset's missing source in the current directory too (no prefix can stop it):
    raw h5py from a folder holding shards/shard-00001.h5 reads that decoy as the run's missing shard. hpcviz's
    readers (store.open_checked, read_shard, inspect_results.py) refuse it, exit 2; from the viz folder raw h5py
    reads fill values instead (the README's advice)."""
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run, symlinks=True)
    viz, decoy = run / "viz", tmp_path / "decoy"
    (decoy / "shards").mkdir(parents=True)
    shutil.copy(viz / "shards" / "shard-00000.h5", decoy / "shards" / "shard-00001.h5")  # other images' data
    with h5py.File(viz / "shards" / "shard-00000.h5") as f:
        n0, decoy_index = len(f["index"]), f["index"][()].tolist()
    (viz / "shards" / "shard-00001.h5").unlink()
    read = [sys.executable, "-c", "import h5py, json, sys\nwith h5py.File(sys.argv[1]) as f:\n"
            "    print(json.dumps(f['index'][()].tolist()))", str(viz / "viz.h5")]
    from_decoy = json.loads(subprocess.run(read, cwd=decoy, capture_output=True, text=True, timeout=60).stdout)
    assert from_decoy[n0:] == decoy_index  # HDF5 read the decoy as the run's shard 1, without a word
    from_viz = json.loads(subprocess.run(read, cwd=viz, capture_output=True, text=True, timeout=60).stdout)
    assert from_viz[n0:] == [-1] * (len(from_viz) - n0)  # from the viz folder: fill values, no other file's data
    checked = ("import sys\nfrom hpcviz import store\ntry:\n    with store.open_checked(sys.argv[1]) as f:\n"
               "        print(list(f['index'][()]))\nexcept store.StoreError as e:\n    print('refused', e)")
    r = subprocess.run([sys.executable, "-c", checked, str(viz / "viz.h5")], cwd=decoy, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.startswith("refused") and "shards/shard-00001.h5, which is missing" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "inspect_results.py"), str(viz / "viz.h5"), "index"],
                       cwd=decoy, capture_output=True, text=True, timeout=120)
    _one_error(r, 2, "shards/shard-00001.h5, which is missing")  # bad input: nothing ran and failed


@pytest.mark.slow
def test_issue20_hostile_class_names(tmp_path):
    """Class names are shown as written everywhere: rich (no markup), Markdown, HTML, figures (no mathtext),
    terminal (no control codes). A run with such classes, made cheaply by import_model.py from a packed file."""
    import torch

    from hpcviz.data.sources import make_builtin
    from hpcviz.models import build_model
    from hpcviz.store import PackedWriter
    k = len(HOSTILE_CLASSES)
    w = PackedWriter(tmp_path / "hostile.h5", 10 * k, 16, 16, HOSTILE_CLASSES, {"source": "test"})
    w.append(make_builtin(10, 16).images.numpy()[:10 * k], np.arange(10 * k) % k)
    w.close()
    torch.save(build_model("resnet20", k, "cifar").state_dict(), tmp_path / "w.pt")
    run = tmp_path / "run"
    steps = [("import_model.py", ["--weights", str(tmp_path / "w.pt"), "--arch", "resnet20", "--data",
                                  str(tmp_path / "hostile.h5"), "--image-size", "16", "--run", str(run),
                                  "--device", "cpu", "--normalize", "data"]),
             ("launch_viz.py", ["--run", str(run), "--cluster", "local", "--device", "cpu", "--images", "9",
                                "--tasks", "1", "--split", "train", "--blocks", "conv1,layer3.2", "--deconv-blocks",
                                "none", "--invert-blocks", "none", "--featviz-blocks", "layer3.2", "--featviz-steps",
                                "2"]),
             ("aggregate.py", ["--run", str(run)]),
             ("inspect_results.py", [str(run)]),
             ("inspect_results.py", [str(run / "viz" / "viz.h5")]),
             ("inspect_results.py", [str(run), "--block", "layer3.2", "--channel", "0", "--png",
                                     str(tmp_path / "ch.png")])]
    out = {}
    for command, args in steps:
        r = run_case(command, args, tmp_path, run)
        assert r.returncode == 0 and "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr[-3000:]
        assert "\x1b" not in r.stdout + r.stderr, command  # a control code from a class name reaches no terminal
        out[command] = r.stdout
    shown = out["inspect_results.py"]
    assert "[/]" in shown and "[red]a" in shown and "esc\\x1b[31mred" in shown  # literal, not rich markup
    md = (run / "report" / "report.md").read_text() + (run / "report" / "tables" / "per_class_accuracy.md").read_text()
    for name in ("\\[/\\]", "\\[red\\]a", "\\$x\\$", "\\*b\\*\\_c\\_", "&lt;b&gt;&amp;amp;&lt;/b&gt;",
                 "a\\|b \\[l\\](http://e)", "esc\\\\x1b\\[31mred"):
        assert name in md, name
    page = (run / "report" / "report.html").read_text()
    assert "&lt;b&gt;&amp;amp;&lt;/b&gt;" in page and "<b>&amp;" not in page and "\x1b" not in page + md
    assert "atlas/index.html" in page and "atlas/index.html" in md
    for atlas in ((run / "report" / "atlas").glob("*.html")):  # the atlas shows them as written too
        text = atlas.read_text()
        assert "<b>&amp;" not in text and "\x1b" not in text and "<script" not in text, atlas
    assert "&lt;b&gt;&amp;amp;&lt;/b&gt;" in (run / "report" / "atlas" / "layer3.2.html").read_text()
    from PIL import Image
    for png in [*(run / "report" / "figures").glob("*.png"), tmp_path / "ch.png"]:
        with Image.open(png) as im:
            im.load()  # every figure was drawn: mathtext did not choke on "$\\undefined$"
