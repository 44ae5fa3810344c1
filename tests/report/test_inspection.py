"""hpcviz.inspect (run summaries, HDF5 trees) and the jobs/inspect_results.py command."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from hpcviz.report.inspection import render_stats, render_tree, summarize_run
from hpcviz.store import ShardWriter, dataset_stats, describe, write_view

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def text(renderable) -> str:
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(renderable)
    return console.export_text()


def write_shard(path: Path, n: int, offset: int = 0) -> None:
    rng = np.random.default_rng(offset)
    with ShardWriter(path, n, {"arch": "resnet20", "class_names": ["a", "b"], "shard": offset}) as w:
        w.write("index", 0, np.arange(offset, offset + n), dims=("image",))
        w.write("images", 0, rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8), dims=("image", "channel", "y", "x"))
        w.write("label", 0, rng.integers(0, 2, n), dims=("image",))
        w.write("act/layer1.0", 0, rng.standard_normal((n, 6, 4, 4)).astype(np.float32),
                dims=("image", "channel", "y", "x"), dtype=np.float16, attrs={"block": "layer1.0"})


def make_run(run: Path) -> list[Path]:
    """A run with train done, eval.json, 3 expected shards: 2 complete, 1 killed mid-write; collated."""
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"train": {"status": "done", "job_id": "42", "val_accuracy": 0.875,
                                                             "updated": "2026-01-01T00:00:00"},
                                                   "viz": {"status": "running", "job_id": "43"}}))
    (run / "config.json").write_text(json.dumps({"train": {"arch": "resnet20", "epochs": 3, "data": "builtin"}}))
    (run / "eval.json").write_text(json.dumps({"split": "val", "accuracy": 0.875, "n": 40, "train_accuracy": 0.9}))
    shards = run / "viz" / "shards"
    paths = [shards / f"shard-{k:05d}.h5" for k in range(3)]
    write_shard(paths[0], 4)
    write_shard(paths[1], 3, offset=4)
    (shards / "shard-00002.h5.tmp-4242").write_bytes(b"\x89HDF\r\n\x1a\n half")
    write_view(paths, run / "viz" / "viz.h5")
    (shards / "shard-00003.h5").write_text("not a shard")  # e.g. a file from elsewhere
    return paths


def test_summarize_run(tmp_path):
    run = tmp_path / "run"
    paths = make_run(run)
    out = text(summarize_run(run))
    assert "train" in out and "done" in out and "42" in out and "val_accuracy=0.875" in out
    assert "viz" in out and "running" in out
    assert "config train: arch=resnet20 data=builtin epochs=3" in out
    assert "accuracy (eval.json, val): 87.50% of 40 images, train 90.00%" in out
    assert "2 complete of 3 file(s)" in out and "shard-00002.h5.tmp-4242" in out and "killed" in out
    assert any("shard-00003.h5" in line and "not an HDF5 file" in line for line in out.splitlines())
    assert "viz/viz.h5: 7 images from 2 shard(s), INCOMPLETE; left out when collated: shard-00002.h5" in out
    assert "MISSING since" not in out
    assert "STALE" not in out and "report: not run yet" in out
    later = time.time() + 5
    os.utime(paths[1], (later, later))  # a shard rewritten after collation
    assert "STALE: shard-00001.h5 newer than viz.h5" in text(summarize_run(run))
    paths[0].unlink()  # a shard lost after collation: viz.h5 is no longer whole, and the summary says which
    out = text(summarize_run(run))
    assert "MISSING since: shard-00000.h5" in out and "complete" not in out.split("viz/viz.h5:")[1].split("\n")[0]


def test_summarize_empty_run(tmp_path):
    out = text(summarize_run(tmp_path))
    for line in ("stages: not run yet", "config: not run yet", "accuracy: not run yet (eval.json)",
                 "visualization shards: not run yet", "viz/viz.h5: not collated yet", "report: not run yet"):
        assert line in out
    (tmp_path / "manifest.json").write_text('{"train": ')  # a torn file is reported, not a crash
    assert "stages: unreadable" in text(summarize_run(tmp_path))


def test_render_tree_and_stats(tmp_path):
    paths = make_run(tmp_path / "run")
    out = text(render_tree(describe(paths[0])))
    assert "act/" in out and "layer1.0  (4, 6, 4, 4) float16  dims image×channel×y×x  chunks (4, 6, 4, 4)" in out
    assert "block = layer1.0" in out and "fp16_overflow = 0" in out and "class_names = [a, b]" in out
    assert "index  (4,) int64" in out and "(dimension scale)" in out and "dim 0 → index" in out
    out = text(render_tree(describe(tmp_path / "run" / "viz" / "viz.h5")))
    assert "(7, 3, 8, 8) uint8" in out and "virtual over 2 file(s)" in out and "missing_shards" in out
    out = text(render_stats(dataset_stats(paths[1], "images", 2)))
    assert "images: image 2, uint8 (3, 8, 8)" in out and "count" in out and "192" in out


# ----------------------------------------------------------------------------- jobs/inspect_results.py
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user runs it: the installed package
    return subprocess.run([sys.executable, "jobs/inspect_results.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_tree_stats_png(tmp_path):
    paths = make_run(tmp_path / "run")
    r = run_cli(str(paths[0]))
    assert r.returncode == 0, r.stderr
    assert "layer1.0  (4, 6, 4, 4) float16" in r.stdout and "images  (4, 3, 8, 8) uint8" in r.stdout
    png = tmp_path / "out" / "maps.png"
    png.parent.mkdir()
    r = run_cli(str(tmp_path / "run" / "viz" / "viz.h5"), "act/layer1.0", "--index", "5", "--png", str(png))
    assert r.returncode == 0, r.stderr
    assert "act/layer1.0: image 5, float16 (6, 4, 4)" in r.stdout and "mean (finite)" in r.stdout
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_cli_bad_dataset_path(tmp_path):
    paths = make_run(tmp_path / "run")
    r = run_cli(str(paths[0]), "act/layer9")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1
    assert "no dataset 'act/layer9'; valid: act/layer1.0" in r.stderr
    r = run_cli(str(paths[0]), "nope")
    assert r.returncode == 2 and "valid: act/, images, index, label;" in r.stderr


def load_cli():
    from hpcviz.commands import inspect
    return inspect


@pytest.mark.parametrize("case", ["not_hdf5", "truncated", "index", "png_of_labels", "dir_with_dataset", "missing"])
def test_cli_errors_in_process(tmp_path, capsys, case):
    cli = load_cli()
    paths = make_run(tmp_path / "run")
    target, extra = str(paths[0]), []
    if case == "not_hdf5":
        target = str(tmp_path / "run" / "eval.json")
    elif case == "truncated":
        data = paths[0].read_bytes()
        paths[0].write_bytes(data[: len(data) // 2])
    elif case == "index":
        extra = ["images", "--index", "4"]
    elif case == "png_of_labels":
        extra = ["label", "--png", str(tmp_path / "x.png")]
    elif case == "dir_with_dataset":
        target, extra = str(tmp_path / "run"), ["images"]
    else:
        target = str(tmp_path / "run" / "viz" / "shards" / "shard-00002.h5")
    assert cli.main(cli.get_args_parser(add_help=True).parse_args([target, *extra])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    expect = {"not_hdf5": "not an HDF5 file", "truncated": "truncated", "index": "index 4 out of range",
              "png_of_labels": "--png: label holds ()", "dir_with_dataset": "is a run directory",
              "missing": "only shard-00002.h5.tmp-4242 exists"}[case]
    assert expect in err
    assert not (tmp_path / "x.png").exists()


def test_cli_in_process_summary_and_rgb_png(tmp_path, capsys):
    cli = load_cli()
    make_run(tmp_path / "run")
    parser = cli.get_args_parser(add_help=True)
    assert cli.main(parser.parse_args([str(tmp_path / "run")])) == 0
    assert "87.50%" in capsys.readouterr().out
    png = tmp_path / "images.png"
    assert cli.main(parser.parse_args([str(tmp_path / "run" / "viz" / "viz.h5"), "images", "--png", str(png),
                                       "--max-items", "5"])) == 0
    assert "wrote" in capsys.readouterr().out and png.read_bytes()[:8] == PNG_MAGIC
