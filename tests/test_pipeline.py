"""The whole pipeline in the local debug mode (train -> array -> aggregate in order), its status view,
--retry-failed, and bad requests refused before anything is written. The same on the real SLURM
cluster, with dependencies, is in test_slurm.py."""
import json

import numpy as np
import pytest

from hpcviz import store, viz
from hpcviz.commands import pipeline as launch_pipeline
from hpcviz.config import TrainConfig
from hpcviz.pipeline import PipelineTrainJob, check_request
from hpcviz.rundir import RunDir

TINY = ["--data", "builtin:20", "--image-size", "16", "--arch", "resnet20", "--epochs", "1", "--batch-size", "32",
        "--lr", "0.05", "--device", "cpu", "--images", "8", "--tasks", "2", "--invert-steps", "5",
        "--report-images", "1", "--invert-images", "2"]


def pipeline(*args) -> int:
    try:
        return launch_pipeline.main(launch_pipeline.get_args_parser().parse_args(list(args)))
    except SystemExit as e:  # argparse's own refusals (a value of the wrong type)
        return int(e.code or 0)


def test_local_pipeline_then_status_then_retry(tmp_path, capsys):
    run = tmp_path / "p"
    assert pipeline("--cluster", "debug", "--run", str(run), *TINY) == 0
    out = capsys.readouterr().out
    assert f"report: {run}/report/report.html" in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert [manifest[s]["status"] for s in ("train", "viz", "aggregate")] == ["done", "done", "done"]
    assert manifest["pipeline"]["cluster"] == "debug"
    plan = json.loads((run / "viz" / "plan.json").read_text())  # written by the training job
    assert plan["n_images"] == 8 and len(plan["shards"]) == 2
    assert (run / "report" / "figures" / "inversions.png").exists()
    assert pipeline("--run", str(run), "--status") == 0
    table = capsys.readouterr().out
    for stage in ("train", "viz[0]", "viz[1]", "aggregate"):
        assert stage in table
    assert table.count("done (verified)") == 2
    # a lost shard: the status shows it, the report names it, --retry-failed redoes only it
    first = store.read_shard(run / "viz" / "viz.h5")
    RunDir(run).shard(1).unlink()
    assert pipeline("--run", str(run), "--status") == 0
    assert "missing" in capsys.readouterr().out
    mtime0 = RunDir(run).shard(0).stat().st_mtime_ns
    assert pipeline("--run", str(run), "--retry-failed", "--cluster", "debug") == 0
    assert RunDir(run).shard(0).stat().st_mtime_ns == mtime0  # the good shard was not redone
    again = store.read_shard(run / "viz" / "viz.h5")
    assert set(again) == set(first) and all(np.array_equal(again[k], first[k]) for k in first)
    assert "Warning" not in (run / "report" / "report.md").read_text()
    # a second run without --resume refuses; with it, finished stages are skipped
    assert pipeline("--cluster", "debug", "--run", str(run), *TINY) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (["--invert-blocks", "layer9.9"], "layer9.9"),
    (["--paths", "sideways"], "valid paths are both, residual, shortcut"),
    (["--prior", "l2"], "--prior 'l2'"),
    (["--arch", "resnet7"], "--arch 'resnet7'"),
    (["--data", "/nonexistent/images"], "/nonexistent/images"),
    (["--viz-split", "test"], "--viz-split 'test': not one of val, train"),
    (["--viz-batch-size", "0"], "--viz-batch-size 0: must be at least 1"),
    (["--indices", "3,x"], "--indices '3,x': not comma-separated integers"),
])
def test_bad_requests_are_one_line_and_write_nothing(tmp_path, capsys, bad, message):
    run = tmp_path / "bad"
    assert pipeline("--cluster", "debug", "--run", str(run), *TINY, *bad) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not run.exists()


@pytest.mark.parametrize("bad, error, warning", [
    (["--lr", "1e9"], "TrainingError: loss is not finite",
     "training stage: failed: TrainingError: loss is not finite"),
    (["--indices", "5,99999"], "VizError: --indices [99999]: outside the val split of 20 images",
     "visualization stage: failed: VizError: --indices [99999]"),
])
def test_a_failing_stage_still_gets_a_report(tmp_path, capsys, bad, error, warning):
    run = tmp_path / "fails"  # local: the debug executor would open pdb on the job's exception
    assert pipeline("--cluster", "local", "--run", str(run), *TINY, *bad) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and error in errors[0], errors
    assert warning in (run / "report" / "report.html").read_text()


def test_status_and_retry_of_a_run_that_is_not_there(tmp_path, capsys):
    assert pipeline("--run", str(tmp_path / "none"), "--status") == 2
    assert pipeline("--run", str(tmp_path / "none"), "--retry-failed", "--cluster", "debug") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("no manifest.json" in line and line.startswith("error: --run") for line in err)


def test_check_request_counts_tasks_and_the_train_job_requeues_as_itself():
    cfg = TrainConfig(arch="resnet20")
    assert check_request(cfg, viz.VizConfig(images=5, tasks=8)) == 5  # never an empty shard
    assert check_request(cfg, viz.VizConfig(indices=[1, 2, 3], tasks=2)) == 2
    job = PipelineTrainJob(viz.VizConfig(run_dir="r", images=3))
    again = job.checkpoint(cfg)
    assert isinstance(again.function, PipelineTrainJob) and again.function.viz_cfg.images == 3
    assert again.args[0].resume == "auto"
